"""Data at scale: mixtures and stages, cleaning, the prepared cache (parallel, resumable), formats, the held-out
split, bad data, exact resumption and its guard, packing fill rate, bits per byte.

numpy + sentencepiece + grain (no jax) on small corpora written to tmp_path, except the fill-rate check, which
reads the real stdlib corpus of `make run`.
"""

from __future__ import annotations

import json
import logging
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from maxlm.config import ConfigError, DataConfig, load_config, resolve_config_path
from maxlm.data import BATCH_KEYS, BOS_ID, EOS_ID, build_dataset, load_tokenizer, pack_stats, train_tokenizer
from maxlm.data.cache import Cache
from maxlm.data.clean import Filters, document_hash, is_eval, non_text_ratio
from maxlm.data.prepare import prepare_cache
from maxlm.data.sources import JsonlSource, split_lines

STDLIB = sysconfig.get_paths()["stdlib"]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def doc(i: int, tag: str = "doc") -> str:
    """A distinct, tokenizable document of 60-260 characters."""
    return f"{tag} {i}: " + " ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(10 + i % 40)) + "\n"


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("tok")
    (root / "corpus.txt").write_text("".join(doc(i, t) for i in range(200) for t in ("doc", "web", "wiki", "code")))
    return train_tokenizer(str(root / "corpus.txt"), 400, str(root / "tok.model"))


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _cfg(tok: str, **kw: object) -> DataConfig:
    return DataConfig(**{"seq_len": 64, "tokenizer": tok, **kw})  # type: ignore[arg-type]


def _take(ds: object, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(ds)  # type: ignore[call-overload]
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def _docs_seen(batches: list[dict[str, np.ndarray]], tok: str) -> set[str]:
    """Whole documents back as text (each short document is one packed segment [bos] ids -> ids [eos])."""
    t = load_tokenizer(tok)
    out = set()
    for b in batches:
        for r in range(b["inputs"].shape[0]):
            seg = b["inputs_segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                m = seg == s
                inputs, targets = b["inputs"][r][m], b["targets"][r][m]
                if inputs[0] == BOS_ID and targets[-1] == EOS_ID:
                    out.add(t.decode(targets[:-1]))
    return out


def _same(a: list[dict[str, np.ndarray]], b: list[dict[str, np.ndarray]]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in BATCH_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Config schema of the data section


def test_mixture_config_is_typed_and_checked(tmp_path: Path, tok: str) -> None:
    web = _write_jsonl(tmp_path / "web.jsonl", [doc(i) for i in range(5)])
    ok = load_config(resolve_config_path("tiny"), [
        f"data.tokenizer={tok}", "data.stage_starts=[0.9]",
        f"data.mixture=[{{name: web, path: '{web}', weight: 0.7, stage_weights: [0.2]}}, "
        f"{{name: syn, format: synthetic, weight: 0.3, stage_weights: [0.8]}}]"])
    from maxlm.config.data_spec import components

    web_c, syn_c = components(ok.data)
    assert (web_c.format, web_c.weight, web_c.weight_at(1), syn_c.weight_at(1)) == ("jsonl", 0.7, 0.2, 0.8)
    bad = [
        ("data.mixture=[{name: web, path: x.jsonl, wieght: 1}]", "data.mixture[0]: unknown key 'wieght'; did you "
                                                                  "mean weight?"),
        ("data.mixture=[{path: x.jsonl}]", "data.mixture[0]: needs a name"),
        ("data.mixture=[{name: a, path: x.jsonl}, {name: a, path: y.jsonl}]", "used twice"),
        ("data.mixture=[{name: a, path: x.csv, format: csv}]", "data.mixture[0].format='csv' is not one of"),
        ("data.mixture=[{name: a, path: x.jsonl, weight: 0}]", "at least one source needs a positive weight"),
        ("data.mixture=[{name: a, path: x.jsonl, stage_weights: [1, 2]}]", "stage_weights has 2 entries"),
        ("data.eval_fraction=1.5", "data.eval_fraction=1.5 must be in [0, 1)"),
        ("data.resume=maybe", "data.resume='maybe' is not one of exact, reshuffle"),
        (f"data.mixture=[{{name: a, path: '{tmp_path}/none/*.jsonl'}}]", "data.mixture: no files match any"),
    ]
    for override, message in bad:
        with pytest.raises(ConfigError) as e:
            load_config(resolve_config_path("tiny"), [f"data.tokenizer={tok}", override]
                        + (["data.stage_starts=[0.5]"] if "stage_weights: [1, 2]" in override else []))
        assert message in str(e.value), (override, str(e.value))
    with pytest.raises(ConfigError, match="train.eval_every=5 needs a held-out split"):
        load_config(resolve_config_path("tiny"), ["data.source=jsonl", f"data.path={web}", f"data.tokenizer={tok}",
                                                  "train.eval_every=5"])


# ---------------------------------------------------------------------------------------------------------------
# Mixtures and stages


def test_mixture_realises_token_shares_deterministically(tmp_path: Path, tok: str) -> None:
    a = _write_jsonl(tmp_path / "a" / "a.jsonl", [doc(i, "web") for i in range(60)])
    b = tmp_path / "b"
    b.mkdir()
    for i in range(30):
        (b / f"{i}.txt").write_text(doc(i, "wiki") * 3)
    mix = [{"name": "web", "path": str(a), "weight": 0.75}, {"name": "wiki", "path": f"{b}/*.txt", "weight": 0.25}]
    cfg = _cfg(tok, mixture=mix)
    it = iter(build_dataset(cfg, vocab_size=400, batch_size=8, seed=0))
    first = [next(it) for _ in range(60)]
    stats = it.stats()
    it.close()
    assert abs(stats["data_mix_web"] - 0.75) < 0.02 and abs(stats["data_mix_wiki"] - 0.25) < 0.02, stats
    assert stats["data_fill_rate"] > 0.8
    assert _same(first[:5], _take(build_dataset(cfg, vocab_size=400, batch_size=8, seed=0), 5))
    assert not _same(first[:5], _take(build_dataset(cfg, vocab_size=400, batch_size=8, seed=1), 5))


def test_stages_switch_weights_at_the_exact_step(tmp_path: Path, tok: str) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [doc(i, "web") for i in range(40)])
    mix = [{"name": "web", "path": str(a), "weight": 1.0, "stage_weights": [0.0]},
           {"name": "hq", "format": "synthetic", "weight": 0.0, "stage_weights": [1.0]}]
    it = iter(build_dataset(_cfg(tok, mixture=mix, stage_starts=[0.75]), vocab_size=400, batch_size=4, seed=0,
                            total_steps=12))
    hq = []
    for _ in range(12):
        next(it)
        hq.append(it.stats()["data_mix_hq"])
    it.close()
    assert hq[:9] == [0.0] * 9 and 0 < hq[9] < hq[10] < hq[11]  # stage 1 begins at batch round(0.75 * 12) = 9
    with pytest.raises(ConfigError, match="total_steps"):
        build_dataset(_cfg(tok, mixture=mix, stage_starts=[0.75]), vocab_size=400, batch_size=4, seed=0)


# ---------------------------------------------------------------------------------------------------------------
# Resumption and its guard


@pytest.mark.parametrize("cached", [False, True])
def test_forty_batches_save_rebuild_next_eight_identical(tmp_path: Path, tok: str, cached: bool) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [doc(i, "web") for i in range(50)])
    mix = [{"name": "web", "path": str(a), "weight": 0.6, "stage_weights": [0.2]},
           {"name": "syn", "format": "synthetic", "weight": 0.4, "stage_weights": [0.8]}]
    cfg = _cfg(tok, mixture=mix, stage_starts=[0.5], eval_fraction=0.1,
               cache_dir=str(tmp_path / "cache") if cached else "")
    if cached:
        prepare_cache(load_config(None, [f"data.{k}={json.dumps(v)}" for k, v in cfg.__dict__.items()]),
                      workers=1, progress=False)

    def build() -> object:
        return iter(build_dataset(cfg, vocab_size=400, batch_size=4, seed=0, total_steps=90))

    it = build()
    for _ in range(40):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    want = [next(it) for _ in range(8)]  # crosses the stage boundary at batch 45
    it.close()
    resumed = build()
    resumed.set_state(state)
    assert _same([next(resumed) for _ in range(8)], want)
    assert resumed.stats()["data_stage"] == 1.0
    resumed.close()


def test_changed_shard_count_is_refused_or_reshuffled(tmp_path: Path, tok: str) -> None:
    a = _write_jsonl(tmp_path / "a.jsonl", [doc(i) for i in range(40)])
    cfg = _cfg(tok, source="jsonl", path=str(a))
    it = iter(build_dataset(cfg, vocab_size=400, batch_size=4, seed=0, shard_index=0, shard_count=2))
    for _ in range(3):
        next(it)
    state = it.get_state()
    other = iter(build_dataset(cfg, vocab_size=400, batch_size=4, seed=0))
    with pytest.raises(ConfigError, match=r"cannot restore the data iterator exactly \(shard_count 2 -> 1\).*"
                                          "data.resume=reshuffle"):
        other.set_state(state)
    cfg.resume = "reshuffle"
    other = iter(build_dataset(cfg, vocab_size=400, batch_size=4, seed=0))
    other.set_state(state)
    next(other)
    assert other.batches == 4


# ---------------------------------------------------------------------------------------------------------------
# The cache: cleaning, dedup, resumable parallel prepare, reading


def _corpus(root: Path) -> dict[str, str]:
    """A mixture with duplicates (also across sources), filtered and bad items, in three formats."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    web = [doc(i, "web") for i in range(30)] + [doc(3, "web"), doc(4, "web"), "tiny\n", "x" * 5000,
                                                 "bin\x00\x01\x02\x03\x04\x05" * 20]
    _write_jsonl(root / "web" / "part0.jsonl", web[:20])
    _write_jsonl(root / "web" / "part1.jsonl", web[20:])
    with open(root / "web" / "part1.jsonl", "ab") as f:
        f.write(b'{"text": "broken\n' + json.dumps({"body": "no text"}).encode() + b"\n"
                + json.dumps({"text": "caf\xe9"}).encode("utf-8").replace(b"\\u00e9", b"\xe9") + b"\n")
    (root / "web" / "empty.jsonl").write_text("")
    books = root / "books"
    books.mkdir()
    for i in range(6):
        (books / f"{i}.txt").write_text("\n\n".join(doc(10 * i + j, "book") for j in range(5)) + "\n")
    (books / "dup.txt").write_text(doc(0, "web"))  # a web document again, in another source and format
    pq.write_table(pa.table({"content": [doc(i, "code") for i in range(25)]}), root / "code.parquet",
                   row_group_size=10)
    return {"web": f"{root}/web/*.jsonl", "books": f"{books}/*.txt", "code": str(root / "code.parquet")}


def _mixture(paths: dict[str, str]) -> list[dict[str, object]]:
    return [{"name": "web", "path": paths["web"], "weight": 0.5},
            {"name": "books", "path": paths["books"], "weight": 0.3, "text_split": "blank_line"},
            {"name": "code", "path": paths["code"], "weight": 0.2, "text_field": "content"}]


def _prep_config(tok: str, paths: dict[str, str], cache: Path, *extra: str):
    return load_config(None, [f"data.tokenizer={tok}", f"data.cache_dir={cache}", "data.min_doc_chars=20",
                              "data.max_doc_chars=2000", "data.max_non_text_ratio=0.2", "data.max_bad_fraction=0.2",
                              "data.eval_fraction=0.2", f"data.mixture={json.dumps(_mixture(paths))}", *extra])


def test_prepare_cleans_dedups_counts_and_resumes(tmp_path: Path, tok: str, capfd: pytest.CaptureFixture) -> None:
    paths = _corpus(tmp_path)
    cfg = _prep_config(tok, paths, tmp_path / "cache")
    manifest = prepare_cache(cfg, workers=2, progress=False)  # 2 worker processes: warnings on their stderr
    web, books, code = (manifest["components"][n] for n in ("web", "books", "code"))
    assert (web["documents"], web["duplicates"], web["bad"]) == (30, 2, 4)  # 2 repeats; 3 bad lines + empty file
    assert web["filtered"] == {"too_short": 1, "too_long": 1, "non_text": 1}
    assert (books["documents"], books["duplicates"]) == (30, 1)  # dup.txt repeats web's document 0
    assert (code["documents"], code["tokens"]) == (25, sum(len(load_tokenizer(tok).encode(doc(i, "code")))
                                                            for i in range(25)))
    warnings = capfd.readouterr().err
    assert "part1.jsonl:16: invalid JSON" in warnings and "part1.jsonl:17: no string field 'text'" in warnings
    assert "part1.jsonl:18: not UTF-8" in warnings and "empty.jsonl: empty file" in warnings

    # Interrupt: lose one part and the manifest; a rerun redoes only that part and gives the same cache.
    cache = tmp_path / "cache"
    first = {p.name: p.read_bytes() for p in (cache / "web").iterdir() if p.suffix in (".arrayrecord", ".npz")}
    os.remove(cache / "manifest.json")
    os.remove(cache / "web" / "part-00000.json")
    os.remove(cache / "web" / "part-00000.arrayrecord")
    stamp = {p: p.stat().st_mtime_ns for p in cache.glob("*/part-*.json")}
    again = prepare_cache(cfg, workers=1, progress=False)
    assert again == manifest
    assert all(p.stat().st_mtime_ns == t for p, t in stamp.items())  # done parts were not redone
    assert {p.name: p.read_bytes() for p in (cache / "web").iterdir() if p.suffix in (".arrayrecord", ".npz")} == first

    # Other inputs into the same directory: refused, unless --overwrite.
    with pytest.raises(ConfigError, match="holds a cache of other inputs"):
        prepare_cache(_prep_config(tok, paths, cache, "data.min_doc_chars=30"), progress=False)
    with pytest.raises(ConfigError, match="prepared with cleaning"):
        build_dataset(_prep_config(tok, paths, cache, "data.min_doc_chars=30").data, vocab_size=400, batch_size=4,
                      seed=0)


def test_cache_matches_raw_pipeline_and_splits_by_hash(tmp_path: Path, tok: str) -> None:
    paths = _corpus(tmp_path)
    cfg = _prep_config(tok, paths, tmp_path / "cache")
    prepare_cache(cfg, workers=1, progress=False)
    cache = Cache(str(tmp_path / "cache"))
    everything = set()
    for split in ("train", "eval"):
        # batches of the cache vs of the raw files (same filters, same split, duplicates aside): same documents
        data = cfg.data
        cached = _docs_seen(_take(build_dataset(data, vocab_size=400, batch_size=8, seed=0, split=split), 30), tok)
        data_raw = DataConfig(**{**data.__dict__, "cache_dir": ""})
        raw = _docs_seen(_take(build_dataset(data_raw, vocab_size=400, batch_size=8, seed=0, split=split), 30), tok)
        assert cached == raw and cached
        assert all(is_eval(document_hash(d), 0.2) == (split == "eval") for d in cached)
        assert not everything & cached
        everything |= cached
    n_docs = sum(len(cache.component(n).select("train", 0.0)) for n in cache.names)
    assert len(everything) == n_docs  # train + eval cover every kept document: nothing lost, nothing shared
    # seq_len, eval_fraction and weights are read-time choices: no re-tokenisation
    data = DataConfig(**{**cfg.data.__dict__, "seq_len": 16, "eval_fraction": 0.5})
    b = _take(build_dataset(data, vocab_size=400, batch_size=2, seed=0), 1)[0]
    assert b["inputs"].shape == (2, 16)


# ---------------------------------------------------------------------------------------------------------------
# Sources, cleaning and bad data


def test_formats_and_text_splitting(tmp_path: Path, tok: str) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = [doc(i, "rec") for i in range(12)]
    w = ArrayRecordWriter(str(tmp_path / "d.arrayrecord"), "group_size:1")
    for d in docs:
        w.write(d.encode())
    w.close()
    seen = _docs_seen(_take(build_dataset(_cfg(tok, source="arrayrecord", path=str(tmp_path / "d.arrayrecord")),
                                          vocab_size=400, batch_size=8, seed=0), 6), tok)
    assert seen == set(docs)
    (tmp_path / "p.txt").write_text("first para\nline two\n\n \t\nsecond para\n\n\n\nthird")
    seen = _docs_seen(_take(build_dataset(_cfg(tok, source="text", path=str(tmp_path / "p.txt"),
                                               text_split="blank_line"), vocab_size=400, batch_size=4, seed=0), 3),
                      tok)
    assert seen == {"first para\nline two", "second para", "third"}


def test_split_lines_cuts_at_line_starts_with_line_numbers(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "big.jsonl", [doc(i) for i in range(200)])
    pieces = split_lines(str(path), 2000)
    assert len(pieces) > 5 and pieces[0].lo == 0 and pieces[-1].hi == path.stat().st_size
    assert all(a.hi == b.lo for a, b in zip(pieces, pieces[1:]))
    whole = JsonlSource([str(path)], "text")
    parts = [JsonlSource([p], "text") for p in pieces]
    assert [s[i] for s in parts for i in range(len(s))] == [whole[i] for i in range(len(whole))]
    assert [s.describe(i) for s in parts for i in range(len(s))] == [whole.describe(i) for i in range(len(whole))]


def test_cleaning_rules() -> None:
    f = Filters(min_chars=5, max_chars=20, max_non_text_ratio=0.1)
    assert f.reject("abc") == "too_short" and f.reject("a" * 21) == "too_long"
    assert f.reject("ok text \x00\x01") == "non_text" and f.reject("fine text\n\t") is None
    assert non_text_ratio("ab\ufffd\x7f") == 0.5 and document_hash("x") == document_hash("x") != document_hash("y")


def test_bad_data_is_skipped_counted_or_refused(tmp_path: Path, tok: str, caplog: pytest.LogCaptureFixture) -> None:
    good = _write_jsonl(tmp_path / "good.jsonl", [doc(i) for i in range(30)])
    (tmp_path / "empty.jsonl").write_text("")
    mix = [{"name": "good", "path": str(good)}, {"name": "nothing", "path": str(tmp_path / "missing" / "*.jsonl")},
           {"name": "empty", "path": str(tmp_path / "empty.jsonl")}]
    with caplog.at_level(logging.WARNING, logger="maxlm.data"):
        it = iter(build_dataset(_cfg(tok, mixture=mix), vocab_size=400, batch_size=4, seed=0))
        batches = [next(it) for _ in range(2)]
    assert "skipping source nothing: data.mixture (nothing).path: no files match" in caplog.text
    assert f"{tmp_path}/empty.jsonl: empty file" in caplog.text and "skipping source empty" in caplog.text
    assert _docs_seen(batches, tok) <= {doc(i) for i in range(30)} and set(it.stats()) >= {"data_mix_good"}
    with pytest.raises(ConfigError, match=r"no source has usable documents"):
        build_dataset(_cfg(tok, mixture=mix[1:]), vocab_size=400, batch_size=4, seed=0)
    mostly_bad = tmp_path / "bad.jsonl"
    mostly_bad.write_bytes(b"".join([b"{oops\n", b'{"text": "\xff\xfe"}\n'] * 5 + [json.dumps({"text": doc(1)})
                                                                                   .encode() + b"\n"]))
    with pytest.raises(ConfigError, match=r"10 of 11 sampled items .* > data.max_bad_fraction=0.1"):
        build_dataset(_cfg(tok, source="jsonl", path=str(mostly_bad)), vocab_size=400, batch_size=4, seed=0)
    cfg = load_config(None, [f"data.tokenizer={tok}", "data.source=jsonl", f"data.path={mostly_bad}",
                             f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(ConfigError, match=r"10 of 11 items \(90.9%\) are unreadable or malformed"):
        prepare_cache(cfg, workers=1, progress=False)
    cfg.data.max_bad_fraction = 1.0
    cfg.data.min_doc_chars = 10_000
    with pytest.raises(ConfigError, match="nothing usable remains"):
        prepare_cache(cfg, workers=1, progress=False, overwrite=True)


# ---------------------------------------------------------------------------------------------------------------
# Packing on the real corpus, bits-per-byte bookkeeping


def test_stdlib_fill_rate_at_seq_len_1024(tmp_path: Path) -> None:
    tok_path = train_tokenizer(f"{STDLIB}/json/*.py,{STDLIB}/email/*.py", 1024, str(tmp_path / "t.model"),
                               max_bytes=500_000)
    from maxlm.demo import stdlib_glob

    for packing in ("first_fit", "best_fit"):
        cfg = DataConfig(source="text", path=stdlib_glob(), tokenizer=tok_path, seq_len=1024, packing=packing)
        it = iter(build_dataset(cfg, vocab_size=1024, batch_size=8, seed=0))
        fills = [pack_stats(next(it)) for _ in range(20)]
        assert np.mean(fills) >= 0.9 and abs(it.stats()["data_fill_rate"] - np.mean(fills)) < 1e-9, fills
        it.close()


def test_token_bytes_sum_to_utf8_length(tok: str) -> None:
    t = load_tokenizer(tok)
    table = t.token_bytes()
    assert table[BOS_ID] == table[EOS_ID] == 0
    for text in [doc(3), "def λ(x):\n\treturn x 🙂 — ¿qué?\r\n", "  spaces  ", ""]:
        assert int(table[t.encode(text)].sum()) == len(text.encode("utf-8")), text
