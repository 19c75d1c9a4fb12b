"""The SFT stage of `make run`: instruction pairs derived from the standard library, no download.

Each pair asks for the body of a stdlib function given its signature and docstring (the user turn) and answers
with the function's real body (the assistant turn), as ChatML conversations (the demo tokenizer has the ChatML
pieces). Functions are found with `ast`, so only short, self-contained bodies are kept, and the split between
training and the held-out answer shown at the end is by content hash (data.eval_fraction), like every maxlm split.
"""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import textwrap
from collections.abc import Iterator

from maxlm.config import Config, expand_globs, load_config, resolve_config_path
from maxlm.data.chat_template import CHATML_END_OF_TURN

log = logging.getLogger(__name__)

INSTRUCTION = "Write the body of this function:\n"
MAX_HEADER_CHARS = 280
MAX_BODY_CHARS = 160
MAX_BODY_LINES = 4
MAX_FILE_BYTES = 60_000  # parsing is the cost: small modules give as many short functions per second


def _pairs_in(path: str) -> Iterator[tuple[str, str]]:
    """(signature + docstring, body) of each short documented function in one file, both dedented."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or ast.get_docstring(node) is None:
            continue
        doc, rest = node.body[0], node.body[1:]
        if not rest or node.end_lineno is None or doc.end_lineno is None:
            continue
        header = "".join(lines[node.lineno - 1:doc.end_lineno])
        body = "".join(lines[doc.end_lineno:node.end_lineno])
        indent = len(header) - len(header.lstrip())
        header = textwrap.dedent(header)
        body = "".join(line[indent:] if line[:indent].isspace() else line for line in body.splitlines(True))
        if (len(header) <= MAX_HEADER_CHARS and 0 < len(body.strip()) and len(body) <= MAX_BODY_CHARS
                and body.count("\n") <= MAX_BODY_LINES):
            yield header, body


def write_stdlib_pairs(glob: str, out: str, max_pairs: int = 4000, seed: int = 0) -> int:
    """Writes up to `max_pairs` conversations (JSONL, field `messages`) from the files `glob` matches, sampled
    over a seeded shuffle of the sorted file list; returns how many were written."""
    files = [f for f in expand_globs(glob) if os.path.getsize(f) <= MAX_FILE_BYTES and "/test" not in f]
    random.Random(seed).shuffle(files)
    seen: set[str] = set()
    rows = []
    for path in files:
        for header, body in _pairs_in(path):
            if header in seen:
                continue
            seen.add(header)
            rows.append({"messages": [{"role": "user", "content": INSTRUCTION + header},
                                      {"role": "assistant", "content": body}]})
        if len(rows) >= max_pairs:
            break
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows[:max_pairs]:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    return min(len(rows), max_pairs)


def run_sft_stage(pre: Config, tok_path: str, overrides: list[str], progress: bool = True) -> int:
    """[4/5] of `maxlm demo`: SFT of the pretrained run `pre` on stdlib pairs, printing the loss on the trained
    (assistant) tokens as it falls and the model's answer to one held-out instruction."""
    from maxlm.data.chat_template import resolve_chat_template
    from maxlm.data.sft_pipeline import is_held_out
    from maxlm.data.tokenizer import load_tokenizer
    from maxlm.generate import Engine, Request
    from maxlm.train.loop import train

    pairs = os.path.join(pre.run_dir, "sft_pairs.jsonl")
    if not os.path.isfile(pairs):
        n = write_stdlib_pairs(pre.data.path, pairs)
        print(f"[4/5] wrote {n} instruction pairs (signature + docstring -> body) from the stdlib to {pairs}")
    cfg = load_config(resolve_config_path("stdlib_sft"), [
        f"data.path={pairs}", f"data.tokenizer={tok_path}",
        f"load_parameters_from={pre.checkpoint.dir or os.path.join(pre.run_dir, 'checkpoints')}"]
        + overrides + [f"run_dir={os.path.join(pre.run_dir, 'sft')}"])
    print(f"[4/5] supervised fine-tuning for {cfg.train.steps} steps, loss on the assistant turns only "
          f"(run_dir={cfg.run_dir})")
    summary = train(cfg, progress=progress)
    print("response loss by step: " + ", ".join(f"{step}: {loss:.3f}" for step, loss in summary["losses"]))
    tok = load_tokenizer(tok_path)
    template = resolve_chat_template(cfg.data.chat_template, tok)
    with open(pairs, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    held = next((r for r in rows if is_held_out(r, cfg.data.eval_fraction)), rows[-1])
    question = held["messages"][:1]
    ids, _ = tok.encode_with_offsets(template.render(question, add_generation_prompt=True))
    run = summary["run"]
    engine = Engine(cfg.model, run.state.params, run.mesh, run.rules, eos_ids=[tok.token_id(CHATML_END_OF_TURN)],
                    max_length=cfg.data.seq_len, decode_text=tok.decode)
    (out,) = engine.generate([Request(ids, 64)])
    print("held-out instruction:\n" + question[0]["content"])
    print("model's answer:\n" + out.text)
    print("reference body:\n" + held["messages"][1]["content"])
    return 0
