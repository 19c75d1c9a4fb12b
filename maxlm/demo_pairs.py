"""Preference pairs from the Python standard library for the `make run` DPO stage: no download, no labels.

Each pair takes a few lines of a stdlib module as the prompt; `chosen` is the real continuation and `rejected`
the same lines corrupted (each line's words in reverse order, and the lines themselves reversed), so the pair shares
its vocabulary and length and differs only in being real code. A pretrained model should learn the preference
quickly: `rewards/accuracies` and `rewards/margins` rise within tens of steps.
"""

from __future__ import annotations

import json
import os
import random

from maxlm.config import expand_globs


def corrupt(lines: list[str]) -> list[str]:
    return [" ".join(reversed(line.split())) for line in reversed(lines)]


def stdlib_pairs(glob: str, n_pairs: int, *, prompt_lines: int = 3, response_lines: int = 3, max_chars: int = 240,
                 seed: int = 0) -> list[dict[str, str]]:
    """`n_pairs` {prompt, chosen, rejected} rows from the files of `glob`, in a seeded order."""
    files = expand_globs(glob)
    rng = random.Random(seed)
    rng.shuffle(files)
    rows: list[dict[str, str]] = []
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                lines = [line.rstrip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError):
            continue
        span = prompt_lines + response_lines
        for start in range(0, len(lines) - span, span * 8):  # a few spread-out windows per file
            prompt = lines[start:start + prompt_lines]
            chosen = lines[start + prompt_lines:start + span]
            rejected = corrupt(chosen)
            text_c, text_r = "\n".join(chosen) + "\n", "\n".join(rejected) + "\n"
            if text_c == text_r or len(text_c) > max_chars or sum(len(x) for x in prompt) > max_chars:
                continue
            rows.append({"prompt": "\n".join(prompt) + "\n", "chosen": text_c, "rejected": text_r})
            if len(rows) >= n_pairs:
                return rows
    return rows


def write_stdlib_pairs(glob: str, out: str, n_pairs: int, seed: int = 0) -> int:
    """Writes the pairs as JSONL (once: an existing file is kept, so later runs reuse its cache); returns the count."""
    if os.path.isfile(out):
        with open(out) as f:
            return sum(1 for _ in f)
    rows = stdlib_pairs(glob, n_pairs, seed=seed)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, out)
    return len(rows)
