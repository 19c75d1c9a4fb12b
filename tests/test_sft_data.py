"""SFT data: formats, templates (== transformers' apply_chat_template), trained-token masks against the text
spans, bad rows, truncation, packing. numpy + tokenizers + jinja2 + grain only (no jax)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from maxlm.config import ConfigError, DataConfig
from maxlm.data.chat_template import CHATML_TEMPLATE, ChatTemplate, resolve_chat_template
from maxlm.data.hf_tokenizer import load_text_tokenizer
from maxlm.data.pipeline import build_dataset
from maxlm.data.sft import BadRow, Encoded, Fields, encode_example, encode_prompt_response, fit_to_length, \
    parse_row
from tests.sft_helpers import CONVERSATIONS, TEMPLATE_TURN_TEXT, ZEPHYR_LIKE, make_hf_tokenizer, \
    make_spm_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf") / "tok")


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return make_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="module")
def zephyr_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tpl") / "zephyr.jinja"
    path.write_text(ZEPHYR_LIKE, encoding="utf-8")
    return str(path)


def _template(kind: str, tok: object, zephyr_file: str) -> ChatTemplate:
    return resolve_chat_template({"chatml": "chatml", "own": "tokenizer", "zephyr": zephyr_file}[kind], tok)


def _trained_ids(enc: Encoded) -> list[int]:
    return enc.ids[enc.mask == 1].tolist()


@pytest.mark.parametrize("kind", ["hf", "spm"])
@pytest.mark.parametrize("template_kind", ["chatml", "own", "zephyr"])
@pytest.mark.parametrize("loss_on", ["assistant", "completion", "all"])
def test_chat_masks_cover_exactly_the_assistant_text(kind: str, template_kind: str, loss_on: str, hf_dir: Path,
                                                     spm_path: str, zephyr_file: str) -> None:
    if kind == "spm" and template_kind == "own":
        pytest.skip("a sentencepiece model has no template of its own")
    tok = load_text_tokenizer(str(hf_dir) if kind == "hf" else spm_path)
    template = _template(template_kind, tok, zephyr_file)
    eos = tok.special_tokens["eos_token"]
    for messages in CONVERSATIONS:
        enc = encode_example(parse_row({"messages": messages}, "messages"), tok, template, loss_on)
        ids, _ = tok.encode_with_offsets(template.render(messages))
        assert enc.ids.tolist() == ids
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        if loss_on == "all":
            assert enc.mask.all()
            continue
        trained = assistant if loss_on == "assistant" else assistant[-1:]
        want = [t for content in trained for t in tok.encode_with_offsets(
            TEMPLATE_TURN_TEXT[template_kind](content, eos))[0]]
        assert _trained_ids(enc) == want


@pytest.mark.parametrize("kind", ["hf", "spm"])
def test_prompt_completion_and_alpaca_masks_follow_trl(kind: str, hf_dir: Path, spm_path: str) -> None:
    tok = load_text_tokenizer(str(hf_dir) if kind == "hf" else spm_path)
    rows = [("prompt_completion", {"prompt": "add 3 and 4\n", "completion": "The answer is 7."}, "The answer is 7."),
            ("alpaca", {"instruction": "Write the body", "input": "def add(a, b):", "output": "return a + b\n"},
             "return a + b\n"),
            ("alpaca", {"instruction": "Say hello", "output": "hello world"}, "hello world")]
    for fmt, row, completion in rows:
        example = parse_row(row, fmt)
        enc = encode_example(example, tok, None, "completion")
        trained = _trained_ids(enc)
        assert trained[-1] == tok.eos_id and enc.ids[0] == tok.bos_id
        assert tok.decode(trained[:-1]) == completion
        assert tok.decode(enc.ids[enc.mask == 0]).endswith(example.prompt)
        assert encode_example(example, tok, None, "all").mask.all()
    if kind == "hf":  # exactly TRL's token arithmetic with transformers' tokenizer
        from transformers import AutoTokenizer

        ref = AutoTokenizer.from_pretrained(str(hf_dir))
        prompt_ids = ref("add 3 and 4\n")["input_ids"]
        full = ref("add 3 and 4\nThe answer is 7.")["input_ids"] + [ref.eos_token_id]
        enc = encode_example(parse_row(rows[0][1], "prompt_completion"), tok, None, "completion")
        assert enc.ids.tolist() == full and enc.mask.tolist() == [0] * len(prompt_ids) + [1] * (len(full) - len(
            prompt_ids))


def test_conversational_prompt_completion_trains_the_completion_turn(hf_dir: Path) -> None:
    tok = load_text_tokenizer(str(hf_dir))
    template = resolve_chat_template("chatml", tok)
    row = {"prompt": CONVERSATIONS[1][:4], "completion": [CONVERSATIONS[1][4]]}
    enc = encode_example(parse_row(row, "prompt_completion"), tok, template, "completion")
    assert tok.decode(_trained_ids(enc)) == CONVERSATIONS[1][4]["content"] + "<|im_end|>\n"
    # the public prompt + response call (used by preference data) gives the same ids and mask
    same = encode_prompt_response(tok, template, CONVERSATIONS[1][:4], CONVERSATIONS[1][4]["content"])
    assert same.ids.tolist() == enc.ids.tolist() and same.mask.tolist() == enc.mask.tolist()


@pytest.mark.parametrize("template_kind", ["own", "chatml", "zephyr"])
def test_token_ids_equal_transformers_apply_chat_template(template_kind: str, hf_dir: Path,
                                                          zephyr_file: str) -> None:
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(hf_dir))
    tok = load_text_tokenizer(str(hf_dir))
    template = _template(template_kind, tok, zephyr_file)
    source = {"own": None, "chatml": CHATML_TEMPLATE, "zephyr": ZEPHYR_LIKE}[template_kind]
    for messages in CONVERSATIONS:
        for gen in (False, True):
            conv = messages[:-1] if gen else messages
            text = ref.apply_chat_template(conv, chat_template=source, tokenize=False, add_generation_prompt=gen)
            ids = ref.apply_chat_template(conv, chat_template=source, tokenize=True, add_generation_prompt=gen,
                                          return_dict=False)
            assert template.render(conv, add_generation_prompt=gen) == text
            assert tok.encode_with_offsets(text)[0] == list(ids)


@pytest.mark.parametrize("row, why", [
    ({"prompt": "x"}, "missing field 'completion'"),
    ({"prompt": "x", "completion": 3}, "is int"),
    ({"prompt": "x", "completion": "  "}, "empty 'completion'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}, "system message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}, "empty assistant"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant message"),
    ({"messages": "hi"}, "non-empty list"),
])
def test_bad_rows_say_why(row: dict, why: str) -> None:
    fmt = "messages" if "messages" in row else "prompt_completion"
    with pytest.raises(BadRow, match=why):
        parse_row(row, fmt, Fields())


def test_truncation_cuts_the_prompt_from_the_left() -> None:
    enc = Encoded(np.arange(10, dtype=np.int32), np.asarray([0] * 7 + [1] * 3, np.int32))
    assert fit_to_length(enc, 10, "drop") == (enc, False)
    assert fit_to_length(enc, 6, "drop") == (None, False)
    cut, truncated = fit_to_length(enc, 6, "left")
    assert truncated and cut.ids.tolist() == [4, 5, 6, 7, 8, 9] and cut.mask.tolist() == [0, 0, 0, 1, 1, 1]
    cut, _ = fit_to_length(enc, 3, "left")  # one prompt token kept before the response, the response's end cut
    assert cut.ids.tolist() == [6, 7, 8] and cut.mask.tolist() == [0, 1, 1]


def _rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"add {i} and {i + 1}"},
                          {"role": "assistant", "content": f"The answer is {2 * i + 1}."}]} for i in range(n)]


def _sft_data(path: Path, tok: str, **kw: object) -> DataConfig:
    return DataConfig(**{"source": "jsonl", "path": str(path), "tokenizer": tok, "example_format": "messages",
                         "seq_len": 48, "chat_template": "chatml", **kw})  # type: ignore[arg-type]


def _batches(data: DataConfig, n: int, batch_size: int = 4) -> tuple[list[dict[str, np.ndarray]], dict]:
    it = iter(build_dataset(data, vocab_size=512, batch_size=batch_size, seed=0))
    out = [next(it) for _ in range(n)]
    return out, it.stats()


def _examples(batches: list[dict[str, np.ndarray]]) -> list[tuple[tuple[int, ...], tuple[float, ...]]]:
    out = []
    for b in batches:
        for r in range(len(b["inputs"])):
            seg = b["inputs_segment_ids"][r]
            for s in np.unique(seg[seg > 0]):
                at = seg == s
                assert (b["inputs_positions"][r][at] == np.arange(at.sum())).all()
                out.append((tuple(b["targets"][r][at].tolist()), tuple(b["targets_weights"][r][at].tolist())))
            assert not b["targets_weights"][r][seg == 0].any()
    return out


def test_packing_keeps_every_example_whole_and_counts_bad_rows(tmp_path: Path, spm_path: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    rows = _rows(40) + ["{not json", {"messages": [{"role": "bot", "content": "x"}]}]
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    with caplog.at_level(logging.WARNING):
        packed, stats = _batches(_sft_data(path, spm_path, packing="best_fit"), 6)
    assert f"{path}:41" in caplog.text and f"{path}:42: messages[0] has unknown role 'bot'" in caplog.text
    assert stats["data_bad"] >= 1 and stats["data_dropped"] == 0
    padded, stats_none = _batches(_sft_data(path, spm_path, packing="none", seq_len=96), 6)
    packed, stats = _batches(_sft_data(path, spm_path, packing="best_fit", seq_len=96), 6)
    assert stats_none["data_fill_rate"] < 0.5 < stats["data_fill_rate"]
    # one example per row without packing; the same examples (targets and weights) as encoding each row alone
    assert all((b["inputs_segment_ids"] <= 1).all() for b in padded)
    tok = load_text_tokenizer(spm_path)
    template = resolve_chat_template("chatml", tok)
    expected = set()
    for row in _rows(40):
        enc = encode_example(parse_row(row, "messages"), tok, template, "assistant")
        expected.add((tuple(enc.ids[1:].tolist()), tuple(enc.mask[1:].astype(np.float32).tolist())))
    ex_packed, ex_padded = _examples(packed), _examples(padded)
    assert len(ex_packed) > 1.5 * len(ex_padded)
    assert {(tuple(t), tuple(w)) for t, w in ex_packed + ex_padded} <= expected


def test_bad_fraction_and_templates_without_assistant_spans_stop_the_run(tmp_path: Path, spm_path: str) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", _rows(3) + [{"messages": []}] * 3)
    with pytest.raises(ConfigError, match=r"3 of 6 sampled rows are malformed .* data.max_bad_fraction=0.1"):
        build_dataset(_sft_data(bad, spm_path), vocab_size=512, batch_size=2, seed=0)
    tpl = tmp_path / "users_only.jinja"
    tpl.write_text("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n{% endif %}{% endfor %}")
    good = write_jsonl(tmp_path / "good.jsonl", _rows(8))
    with pytest.raises(ConfigError, match=f"data.chat_template: {tpl} yields no assistant span"):
        build_dataset(_sft_data(good, spm_path, chat_template=str(tpl)), vocab_size=512, batch_size=2, seed=0)
    long = write_jsonl(tmp_path / "long.jsonl", _rows(8))
    with pytest.raises(ConfigError, match="gives a trainable example"):
        build_dataset(_sft_data(long, spm_path, seq_len=8), vocab_size=512, batch_size=2, seed=0)
    _, stats = _batches(_sft_data(long, spm_path, seq_len=12, truncation="left"), 2, batch_size=2)
    assert stats["data_truncated"] >= 4 and stats["data_dropped"] == 0


def test_mixture_of_formats_and_resume(tmp_path: Path, hf_dir: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", _rows(20))
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"q": f"add {i} and 1\n", "a": f"{i + 1}"} for i in range(20)])
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"instruction": [f"say {i}" for i in range(20)], "output": [str(i) for i in range(20)]}),
                   tmp_path / "alpaca.parquet")
    data = DataConfig(tokenizer=str(hf_dir), seq_len=48, packing="best_fit", mixture=[
        {"name": "chat", "path": str(chat), "example_format": "messages", "weight": 0.5},
        {"name": "pc", "path": str(pc), "example_format": "prompt_completion", "prompt_field": "q",
         "completion_field": "a", "weight": 0.25},
        {"name": "alpaca", "path": str(tmp_path / "alpaca.parquet"), "example_format": "alpaca", "weight": 0.25}])
    ds = build_dataset(data, vocab_size=512, batch_size=2, seed=0)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    rest = [next(it) for _ in range(3)]
    again = iter(build_dataset(data, vocab_size=512, batch_size=2, seed=0))
    again.set_state(state)
    for a, b in zip(rest, [next(again) for _ in range(3)]):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    stats = it.stats()
    assert all(stats[f"data_mix_{n}"] > 0.1 for n in ("chat", "pc", "alpaca"))


def test_packing_none_gives_one_document_chunk_per_row() -> None:
    data = DataConfig(source="synthetic", seq_len=32, packing="none")
    batches, stats = _batches(data, 3, batch_size=4)
    for b in batches:
        seg = b["inputs_segment_ids"]
        assert set(np.unique(seg)) <= {0, 1} and (seg[:, 0] == 1).all()
        assert (b["targets_weights"] == (seg > 0)).all()
        assert (b["inputs_positions"][seg > 0] == np.nonzero(seg > 0)[1]).all()
    assert stats["data_fill_rate"] < 1.0
