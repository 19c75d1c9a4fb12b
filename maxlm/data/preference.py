"""Preference pairs: JSONL rows -> tokenized (prompt, chosen, rejected) -> groups of whole pairs -> batches.

A *group* is the unit the batch dimension counts, so every split of a batch (data shards across hosts, devices,
gradient-accumulation microbatches) moves whole pairs:
  * packed (`data.packing` first_fit/best_fit): one row of seq_len holding up to `data.pairs_per_row` pairs, pair k
    as segments 2k+1 (prompt + chosen) and 2k+2 (prompt + rejected); shape [1, T];
  * padded (`data.packing: none`): one pair as two rows, the chosen sequence in row 0 (segment 1) and the rejected
    in row 1 (segment 2); shape [2, T], one pair per group.
Per-pair scalars have shape [K] (K = pairs_per_row packed, 1 padded): `pair_mask` (1 for a real pair), `margin`
(reward models), and the reference log-probs `ref_chosen_logps` / `ref_rejected_logps` filled in by the
`dpo.reference: precomputed` pass (maxlm.train.reference).

The tokenized groups are built once per (files, fields, tokenizer, layout) and cached as one .npz, so the precomputed
reference log-probs stored beside them address the same groups in every later run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from maxlm.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

# (prompt, response) -> (prompt ids, response ids); the response ids end with eos. Prompt/response are strings,
# or chat messages for a template-aware encoder.
Encoder = Callable[[Any, Any], tuple[list[int], list[int]]]
GROUP_FIELDS = ("inputs", "targets", "inputs_segment_ids", "inputs_positions", "targets_weights")
PAIR_FIELDS = ("pair_mask", "margin", "ref_chosen_logps", "ref_rejected_logps")
MAX_WARNINGS = 5  # file:line warnings printed per reason (all are counted)


@dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    margin: float = 0.0
    # The prompt's ids before the rejected response when they differ from those before the chosen one (tokenizing
    # prompt + response jointly, as TRL does, may merge across the boundary differently).
    rejected_prompt: list[int] | None = None

    @property
    def prompt_r(self) -> list[int]:
        return self.prompt if self.rejected_prompt is None else self.rejected_prompt


@dataclass
class PairStats:
    """What reading the preference files did: rows read and kept, and why the others were skipped."""

    rows: int = 0
    kept: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)

    malformed: int = 0  # rows that are not usable pairs at all (what data.max_bad_fraction bounds)

    def skip(self, where: str, reason: str, malformed: bool = True) -> None:
        self.skipped[reason] += 1
        self.malformed += malformed
        if self.skipped[reason] <= MAX_WARNINGS:
            log.warning("%s: skipped (%s)%s", where, reason,
                        "; further rows skipped for this reason are only counted" if
                        self.skipped[reason] == MAX_WARNINGS else "")

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "truncated": self.truncated, "skipped": dict(self.skipped)}


def sft_encoder(tokenizer: Any, template: Any, add_bos: bool = True) -> Encoder:
    """The SFT machinery's prompt/response encoding (maxlm.data.sft.encode_prompt_response): a string prompt is plain
    text (prompt + response + eos), a list of messages is a conversation the response answers as the next assistant
    turn, rendered with the chat template. A response may be a string, an assistant message or a list ending in one.
    Returns (ids before the first trained token, the rest)."""
    from maxlm.data.sft import encode_prompt_response

    def encode(prompt: Any, response: Any) -> tuple[list[int], list[int]]:
        if isinstance(response, list) and response and isinstance(response[-1], dict):
            response = response[-1]
        if isinstance(response, dict):
            if response.get("role", "assistant") != "assistant":
                raise ValueError("a response message must have role assistant")
            response = response.get("content")
        if not isinstance(response, str) or not response:
            raise ValueError("a response must be a non-empty string or assistant message")
        enc = encode_prompt_response(tokenizer, template, prompt if prompt is not None else "", response, add_bos)
        trained = np.flatnonzero(enc.mask)
        if not len(trained):
            raise ValueError("the response encodes to no trained token")
        first = int(trained[0])
        return [int(x) for x in enc.ids[:first]], [int(x) for x in enc.ids[first:]]

    return encode


def _fit(pc: list[int], c: list[int], pr: list[int], r: list[int], seq_len: int, packed: bool
         ) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """Truncates a pair to fit its layout: the prompts keep their ends (at most a quarter of a packed row, half of a
    padded one), the responses keep their starts. None when not even one response token fits."""

    def size(a: int, b: int, x: int, y: int) -> int:  # a sequence of n tokens takes n positions
        return a + b + x + y if packed else max(a + b, x + y)

    if size(len(pc), len(c), len(pr), len(r)) <= seq_len:
        return pc, c, pr, r
    lp = max(1, seq_len // (4 if packed else 2))
    pc, pr = pc[-lp:], pr[-lp:]
    if packed:
        avail = seq_len - len(pc) - len(pr)
        lc = min(len(c), max(1, avail - min(len(r), avail // 2)))
        lr = min(len(r), avail - lc)
    else:
        lc, lr = min(len(c), seq_len - len(pc)), min(len(r), seq_len - len(pr))
    if lc < 1 or lr < 1:
        return None
    return pc, c[:lc], pr, r[:lr]


def read_pairs(files: list[str], data: DataConfig, encode: Encoder, packed: bool) -> tuple[list[Pair], PairStats]:
    """Every usable pair of the JSONL files; bad rows are skipped with a file:line warning and counted."""
    stats = PairStats()
    pairs: list[Pair] = []
    pf, cf, rf = data.prompt_field, data.chosen_field, data.rejected_field
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                stats.rows += 1
                where = f"{path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    stats.skip(where, "not valid JSON")
                    continue
                if not isinstance(row, dict):
                    stats.skip(where, "not a JSON object")
                    continue
                missing = [k for k in (cf, rf) if not row.get(k)]
                if missing:
                    stats.skip(where, f"no {missing[0]!r} field")
                    continue
                prompt = row.get(pf, row.get("messages", ""))
                if row[cf] == row[rf]:
                    stats.skip(where, "identical chosen and rejected", malformed=False)
                    continue
                try:
                    p, c = encode(prompt, row[cf])
                    p2, r = encode(prompt, row[rf])
                except (ValueError, TypeError, KeyError) as e:
                    stats.skip(where, f"cannot encode: {e}")
                    continue
                fitted = _fit(p, c, p2, r, data.seq_len, packed)
                if fitted is None:
                    stats.skip(where, f"longer than data.seq_len={data.seq_len} even after truncation", malformed=False)
                    continue
                if fitted != (p, c, p2, r):
                    stats.truncated += 1
                p, c, p2, r = fitted
                if c == r:
                    stats.skip(where, "identical chosen and rejected after tokenization/truncation", malformed=False)
                    continue
                margin = row.get(data.margin_field, 0.0) if data.margin_field else 0.0
                if not isinstance(margin, (int, float)) or isinstance(margin, bool):
                    stats.skip(where, f"{data.margin_field!r} is not a number")
                    continue
                pairs.append(Pair(p, c, r, float(margin), None if p2 == p else p2))
                stats.kept += 1
    if stats.rows and stats.malformed / stats.rows > data.max_bad_fraction:
        raise ConfigError(f"data: {stats.malformed} of {stats.rows} preference rows are malformed "
                          f"({dict(stats.skipped)}), more than data.max_bad_fraction={data.max_bad_fraction}; fix the "
                          f"data or data.chosen_field/data.rejected_field/data.prompt_field")
    if not pairs:
        raise ConfigError(f"data: no usable preference pair in {len(files)} file(s) (rows: {stats.rows}, skipped: "
                          f"{dict(stats.skipped)}); each JSONL row needs {pf!r}, {cf!r} and {rf!r}")
    return pairs, stats


def _sequence(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs, targets, weights) of prompt + response: the whole sequence as inputs (a reward model reads its last
    token, eos), next-token targets, weight 1 on every target that is a response token (the last position predicts
    nothing: weight 0)."""
    seq = np.asarray(prompt + response, np.int32)
    weights = np.zeros(len(seq), np.float32)
    weights[len(prompt) - 1:-1] = 1.0
    return seq, np.append(seq[1:], 0).astype(np.int32), weights


def _empty_groups(g: int, rows: int, seq_len: int, k: int) -> dict[str, np.ndarray]:
    out = {f: np.zeros((g, rows, seq_len), np.float32 if f == "targets_weights" else np.int32) for f in GROUP_FIELDS}
    return out | {f: np.zeros((g, k), np.float32) for f in PAIR_FIELDS}


def pack_pairs(pairs: list[Pair], seq_len: int, pairs_per_row: int, packed: bool) -> dict[str, np.ndarray]:
    """Groups of whole pairs as arrays [G, S, T] and [G, K] (see the module docstring for the layout)."""
    if not packed:
        out = _empty_groups(len(pairs), 2, seq_len, 1)
        for g, pair in enumerate(pairs):
            for s, (prompt, resp) in enumerate(((pair.prompt, pair.chosen), (pair.prompt_r, pair.rejected))):
                _place(out, g, s, 0, s + 1, prompt, resp)
            out["pair_mask"][g, 0], out["margin"][g, 0] = 1.0, pair.margin
        return out
    rows: list[list[Pair]] = []
    free: list[int] = []
    for pair in pairs:  # first fit
        need = len(pair.prompt) + len(pair.chosen) + len(pair.prompt_r) + len(pair.rejected)
        for i, space in enumerate(free):
            if need <= space and len(rows[i]) < pairs_per_row:
                rows[i].append(pair)
                free[i] -= need
                break
        else:
            rows.append([pair])
            free.append(seq_len - need)
    out = _empty_groups(len(rows), 1, seq_len, pairs_per_row)
    for g, row in enumerate(rows):
        start = 0
        for k, pair in enumerate(row):
            start = _place(out, g, 0, start, 2 * k + 1, pair.prompt, pair.chosen)
            start = _place(out, g, 0, start, 2 * k + 2, pair.prompt_r, pair.rejected)
            out["pair_mask"][g, k], out["margin"][g, k] = 1.0, pair.margin
    return out


def _place(out: dict[str, np.ndarray], g: int, s: int, start: int, segment: int, prompt: list[int],
           response: list[int]) -> int:
    inputs, targets, weights = _sequence(prompt, response)
    end = start + len(inputs)
    out["inputs"][g, s, start:end] = inputs
    out["targets"][g, s, start:end] = targets
    out["targets_weights"][g, s, start:end] = weights
    out["inputs_segment_ids"][g, s, start:end] = segment
    out["inputs_positions"][g, s, start:end] = np.arange(len(inputs))
    return end


def groups_fingerprint(groups: dict[str, np.ndarray]) -> str:
    """Content hash of the tokenized groups (not of the reference log-probs): names the precomputed reference."""
    h = hashlib.sha256()
    for f in GROUP_FIELDS + ("pair_mask", "margin"):
        h.update(f.encode())
        h.update(np.ascontiguousarray(groups[f]).tobytes())
    return h.hexdigest()[:16]


def build_groups(data: DataConfig, files: list[str], encode: Encoder, encoder_id: str, cache_dir: str = ""
                 ) -> tuple[dict[str, np.ndarray], PairStats | None, str]:
    """Tokenized, shuffled (data.shuffle_seed) and packed groups of every pair in `files`, read from the cache
    `cache_dir` (none: not cached) when it already holds them. Returns (groups, stats or None when cached, path)."""
    packed = data.packing != "none"
    key = {"files": [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files],
           "fields": [data.prompt_field, data.chosen_field, data.rejected_field, data.margin_field],
           "layout": [data.seq_len, data.packing, data.pairs_per_row, data.shuffle_seed], "encoder": encoder_id}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"pairs-{digest}.npz") if cache_dir else ""
    if path and os.path.isfile(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}, None, path
    pairs, stats = read_pairs(files, data, encode, packed)
    order = np.random.default_rng(data.shuffle_seed).permutation(len(pairs))
    groups = pack_pairs([pairs[i] for i in order], data.seq_len, data.pairs_per_row, packed)
    log.info("preference data: %s", stats.as_dict())
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **groups)
        os.replace(tmp, path)
    return groups, stats, path


class _Lookup:
    """Group index -> that group's arrays (a picklable grain map)."""

    def __init__(self, groups: dict[str, np.ndarray]) -> None:
        self.groups = groups

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.groups.items()}


def preference_batches(groups: dict[str, np.ndarray], *, batch_size: int, seed: int, shard_index: int = 0,
                       shard_count: int = 1) -> Any:
    """The infinite, resumable (grain iterator state) stream of batches of whole groups for one host: host h reads
    groups h, h + n, ...; each epoch is a fresh shuffle of them (grain folds the epoch into the seed)."""
    import grain

    idx = np.arange(shard_index, len(groups["pair_mask"]), shard_count)
    if len(idx) < batch_size:
        raise ConfigError(f"data: {len(groups['pair_mask'])} preference groups give this host {len(idx)}, fewer than "
                          f"its batch of {batch_size}; lower train.global_batch_size or add pairs")
    ds = grain.MapDataset.source(idx).shuffle(seed=seed).repeat().map(_Lookup(groups))
    return ds.batch(batch_size, drop_remainder=True).to_iter_dataset()


SYNTHETIC_PAIRS = 1024


def synthetic_groups(data: DataConfig, vocab_size: int) -> dict[str, np.ndarray]:
    """Seeded random pairs (bos + a prompt of seq_len/16..seq_len/8 tokens, each response as long again, then eos),
    packed like real ones: `data.source: synthetic` with a preference objective, to measure the step."""
    rs = np.random.RandomState(data.shuffle_seed)
    lo, hi = max(1, data.seq_len // 16), max(2, data.seq_len // 8)
    pairs = [Pair([2] + list(rs.randint(4, vocab_size, rs.randint(lo, hi))),
                  list(rs.randint(4, vocab_size, rs.randint(lo, hi))) + [3],
                  list(rs.randint(4, vocab_size, rs.randint(lo, hi))) + [3]) for _ in range(SYNTHETIC_PAIRS)]
    return pack_pairs(pairs, data.seq_len, data.pairs_per_row, packed=data.packing != "none")


def load_preference_groups(data: DataConfig, vocab_size: int, cache_dir: str = ""
                           ) -> tuple[dict[str, np.ndarray], str, PairStats | None]:
    """The run's groups from `data.path` (JSONL) and `data.tokenizer` (sentencepiece or HF; chat prompts use
    `data.chat_template`): (groups, their cache file in `cache_dir` or "", stats or None when cached)."""
    from maxlm.data.chat_template import resolve_chat_template
    from maxlm.data.items import list_files
    from maxlm.data.pipeline import _load_checked_tokenizer

    if data.source == "synthetic":  # `maxlm bench` and tests: the shapes of real pairs, no files
        return synthetic_groups(data, vocab_size), "", None
    if data.source != "jsonl":
        raise ConfigError(f"data.example_format=preference reads JSONL rows; set data.source=jsonl (got "
                          f"{data.source!r})")
    files = list_files(data.path, data.max_files)
    tokenizer = _load_checked_tokenizer(data.tokenizer, vocab_size)
    template = resolve_chat_template(data.chat_template, tokenizer)
    with open(tokenizer.path if os.path.isfile(getattr(tokenizer, "path", "") or "") else os.devnull, "rb") as f:
        tok_bytes = f.read()
    encoder_id = hashlib.sha256(tok_bytes + data.tokenizer.encode() + template.source.encode()
                                + bytes([data.add_bos])).hexdigest()[:16]
    groups, stats, path = build_groups(data, files, sft_encoder(tokenizer, template, data.add_bos), encoder_id,
                                       cache_dir)
    return groups, path, stats
