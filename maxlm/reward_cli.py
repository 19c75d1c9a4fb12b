"""`maxlm reward score CHECKPOINT --input rows.jsonl`: scores with a trained reward model.

Rows are JSON objects with `prompt` and `response` (one score each) or `prompt`, `chosen` and `rejected` (both
scored; `chosen_wins` says whether the model agrees). Output: one JSON object per row (stdout or --output), and the
accuracy over pair rows on stderr. Field names follow data.prompt_field/chosen_field/rejected_field when given.
"""

from __future__ import annotations

import argparse
import json
import sys

from maxlm.config import ConfigError


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="maxlm reward", description="reward-model tools")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score", help="score (prompt, response) rows with a reward checkpoint")
    s.add_argument("checkpoint", help="a reward model's run directory, checkpoint directory or step directory")
    s.add_argument("--input", required=True, help="JSONL rows: prompt + response, or prompt + chosen + rejected")
    s.add_argument("--output", default="", help="JSONL output (default: stdout)")
    s.add_argument("--tokenizer", default="", help="sentencepiece .model or HF tokenizer dir (default: the checkpoint's data.tokenizer)")
    s.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    from maxlm.data.chat_template import resolve_chat_template
    from maxlm.data.hf_tokenizer import load_text_tokenizer
    from maxlm.data.preference import sft_encoder
    from maxlm.train.reward_score import load_reward_model, score_sequences

    model_cfg, params, saved = load_reward_model(args.checkpoint)
    data = saved.get("data") or {}
    tok_path = args.tokenizer or data.get("tokenizer") or ""
    if not tok_path:
        raise ConfigError("no tokenizer: pass --tokenizer PATH (the checkpoint's config names none)")
    tokenizer = load_text_tokenizer(tok_path)
    template = resolve_chat_template(data.get("chat_template", "auto"), tokenizer)
    encode = sft_encoder(tokenizer, template, bool(data.get("add_bos", True)))
    pf, cf, rf = (data.get("prompt_field", "prompt"), data.get("chosen_field", "chosen"),
                  data.get("rejected_field", "rejected"))
    rows, seqs = [], []
    with open(args.input) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                keys = [cf, rf] if cf in row and rf in row else ["response"]
                for k in keys:
                    prompt_ids, resp_ids = encode(row.get(pf, ""), row[k])
                    seqs.append(prompt_ids + resp_ids)
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
                raise ConfigError(f"{args.input}:{lineno}: needs {pf!r} with 'response', or {cf!r} and {rf!r} "
                                  f"({type(e).__name__}: {e})") from None
            rows.append((row, keys))
    scores = iter(score_sequences(model_cfg, params, seqs, args.batch_size))
    out = open(args.output, "w") if args.output else sys.stdout
    wins = pairs = 0
    try:
        for row, keys in rows:
            if keys == ["response"]:
                rec = {"score": next(scores)}
            else:
                c, r = next(scores), next(scores)
                rec = {"chosen_score": c, "rejected_score": r, "chosen_wins": c > r}
                wins, pairs = wins + (c > r), pairs + 1
            out.write(json.dumps(row | rec) + "\n")
    finally:
        if args.output:
            out.close()
    if pairs:
        print(f"accuracy {wins / pairs:.4f} on {pairs} pairs", file=sys.stderr)
    return 0
