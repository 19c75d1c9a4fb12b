"""Preference data: bad rows skipped and counted, whole pairs per group, packed == padded log-probs."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from maxlm.config import ConfigError
from maxlm.data.preference import Pair, pack_pairs, read_pairs, sft_encoder
from maxlm.model import Decoder
from maxlm.train.pair_logps import pair_logps
from maxlm.train.preference_batch import preference_batch
from tests.helpers import tiny_config


class CharTokenizer:
    """One id per byte (offset past the special ids): enough to test layouts without a trained tokenizer."""

    bos_id, eos_id, pad_id = 2, 3, 0

    def encode(self, text: str) -> list[int]:
        return [4 + (b % 200) for b in text.encode()]


def write_rows(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def test_bad_rows_are_skipped_with_file_line_and_counted(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    good = [{"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad {i}"} for i in range(20)]
    write_rows(path, good[:10] + ["{not json", {"prompt": "p", "chosen": "same", "rejected": "same"},
                                  {"prompt": "p", "chosen": "only"}] + good[10:])
    cfg = tiny_config("data.seq_len=64")
    with caplog.at_level(logging.WARNING):
        pairs, stats = read_pairs([str(path)], cfg.data, sft_encoder(CharTokenizer(), None), packed=True)
    assert stats.rows == 23 and stats.kept == 20 == len(pairs)
    assert stats.skipped == {"not valid JSON": 1, "identical chosen and rejected": 1, "no 'rejected' field": 1}
    assert f"{path}:11" in caplog.text and f"{path}:12" in caplog.text and f"{path}:13" in caplog.text
    write_rows(path, ["{bad"] * 5 + [json.dumps(good[0])])
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        read_pairs([str(path)], cfg.data, sft_encoder(CharTokenizer(), None), packed=True)


def test_long_pairs_are_truncated_to_fit(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_rows(path, [{"prompt": "p" * 50, "chosen": "c" * 40, "rejected": "r" * 30}])
    cfg = tiny_config("data.seq_len=64")
    (pair,), stats = read_pairs([str(path)], cfg.data, sft_encoder(CharTokenizer(), None), packed=True)
    assert stats.truncated == 1
    assert 2 * len(pair.prompt) + len(pair.chosen) + len(pair.rejected) <= 64
    assert pair.chosen[0] == CharTokenizer().encode("c")[0] and pair.prompt[-1] == CharTokenizer().encode("p")[0]


def random_pairs(n, seed=0, vocab=256):
    rs = np.random.RandomState(seed)
    out = []
    for i in range(n):
        p = [2] + list(rs.randint(4, vocab, rs.randint(2, 9)))
        c = list(rs.randint(4, vocab, rs.randint(1, 7))) + [3]
        r = list(rs.randint(4, vocab, rs.randint(1, 7))) + [3]
        out.append(Pair(p, c, r, margin=float(i)))
    return out


def test_packed_groups_hold_whole_pairs():
    pairs = random_pairs(13)
    g = pack_pairs(pairs, 64, 4, packed=True)
    assert g["inputs"].shape[1:] == (1, 64) and g["pair_mask"].shape[1] == 4
    assert int(g["pair_mask"].sum()) == 13
    for row_seg, row_mask in zip(g["inputs_segment_ids"][:, 0], g["pair_mask"]):
        present = set(np.unique(row_seg[row_seg > 0]))
        assert present == {s for k in np.flatnonzero(row_mask) for s in (2 * k + 1, 2 * k + 2)}


@pytest.fixture(scope="module")
def model_and_params():
    cfg = tiny_config("data.seq_len=64")
    model = Decoder(cfg.model)
    params = model.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"]
    return cfg, model, params


def by_margin(groups, values):
    mask = groups["pair_mask"] > 0
    return dict(zip(groups["margin"][mask].tolist(), np.asarray(values)[mask].tolist()))


def test_packed_equals_padded(model_and_params):
    cfg, model, params = model_and_params
    pairs = random_pairs(10, seed=1)
    packed = pack_pairs(pairs, 64, 4, packed=True)
    padded = pack_pairs(pairs, 64, 1, packed=False)
    (pc1, pr1, lc1, lr1), _, _ = pair_logps(cfg, model, params, preference_batch(packed), None)
    (pc2, pr2, lc2, lr2), _, _ = pair_logps(cfg, model, params, preference_batch(padded), None)
    for a, b in [(pc1, pc2), (pr1, pr2), (lc1, lc2), (lr1, lr2)]:
        ma, mb = by_margin(packed, a), by_margin(padded, b)
        assert ma.keys() == mb.keys() == set(float(i) for i in range(10))
        np.testing.assert_allclose([ma[k] for k in sorted(ma)], [mb[k] for k in sorted(mb)], rtol=1e-5, atol=1e-5)
    lens = by_margin(padded, lc2)
    assert [lens[float(i)] for i in range(10)] == [len(p.chosen) for p in pairs]


def test_synthetic_pairs_feed_a_preference_run(tmp_path):
    """`data.source: synthetic` with a preference objective (what `maxlm bench` uses) yields pair batches."""
    from helpers import tiny_config
    from maxlm.train.builder import build_run
    from maxlm.train.preference_batch import PreferenceBatch

    run = build_run(tiny_config("data.source=synthetic", "train.objective=dpo", "data.seq_len=64",
                                f"run_dir={tmp_path}"))
    batch = next(run.batches)
    assert isinstance(batch, PreferenceBatch) and batch.inputs.shape[:2] == (16, 1)
    assert float(batch.pair_mask.sum()) > 16  # several whole pairs per packed row
