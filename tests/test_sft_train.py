"""SFT on the train step: the loss of a tiny random Hugging Face Llama with its own tokenizer and template equals
a transformers/torch reference (masks from transformers' own assistant-token tracking); packed == unpacked;
k microbatches == one batch; the same loss on several mesh layouts; `maxlm train` end to end with eval."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax
import numpy as np
import pytest

from helpers import tiny_config
from maxlm.config import Config
from maxlm.convert.families import model_config_from_hf
from maxlm.train.batch import global_batch
from maxlm.train.builder import build_run
from tests.sft_helpers import make_hf_tokenizer, write_jsonl

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# ChatML whose assistant text sits in a {% generation %} block: transformers' return_assistant_tokens_mask then gives
# a reference mask computed by transformers itself (maxlm ignores the tag and finds spans by rendering prefixes).
GEN_CHATML = (
    "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>\\n' }}{% endgeneration %}"
    "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
VOCAB = 384
SEQ = 64


def _rows() -> list[dict]:
    rows = []
    for i in range(24):
        turns = [{"role": "user", "content": f"add {i} and {i % 5}"},
                 {"role": "assistant", "content": f"The answer is {i + i % 5}."}]
        if i % 3 == 0:
            turns = [{"role": "system", "content": "be brief"}] + turns + [
                {"role": "user", "content": "how?"}, {"role": "assistant", "content": "hello world"}]
        rows.append({"messages": turns})
    return rows


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, "transformers.LlamaForCausalLM", Path]:
    root = tmp_path_factory.mktemp("sft")
    hf_dir = make_hf_tokenizer(root / "hf", chat_template=GEN_CHATML)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                                   tie_word_embeddings=False, rope_theta=10000.0, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(hf_dir)
    data = write_jsonl(root / "chat.jsonl", _rows())
    return hf_dir, model, data


def sft_config(hf_dir: Path, data: Path, *overrides: str) -> Config:
    hf = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    model = [f"model.{k}={getattr(hf, k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                                    "ffn_dim", "rope_theta", "norm_eps", "tie_embeddings")]
    return tiny_config(*model, f"load_parameters_from={hf_dir}", "train.objective=sft", "data.source=jsonl",
                       f"data.path={data}", f"data.tokenizer={hf_dir}", "data.example_format=messages",
                       f"data.seq_len={SEQ}", "train.global_batch_size=8", "optim.lr=0.01", *overrides)


def reference_loss(hf_dir: Path, model: "transformers.LlamaForCausalLM", batch: dict[str, np.ndarray]) -> float:
    """Every packed example of the batch, recognised by its ids among transformers' renderings of the rows, scored
    alone by the torch model with transformers' assistant mask: mean CE over the trained targets of the batch."""
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    known = {}
    for row in _rows():
        out = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        known[tuple(out["input_ids"])] = np.asarray(out["assistant_masks"])
    nats, count, found = 0.0, 0.0, 0
    for r in range(len(batch["inputs"])):
        seg = batch["inputs_segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            at = np.flatnonzero(seg == s)
            ids = tuple(batch["inputs"][r][at].tolist()) + (int(batch["targets"][r][at[-1]]),)
            mask = known[ids]  # KeyError: maxlm tokenized a row differently from transformers
            found += 1
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, :-1].double()
            ce = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").numpy()
            nats += float((ce * mask[1:]).sum())
            count += float(mask[1:].sum())
            np.testing.assert_array_equal(batch["targets_weights"][r][at], mask[1:])
    assert found >= len(batch["inputs"])
    return nats / count


_FIRST_STEPS: dict[str, tuple[float, dict[str, np.ndarray], dict]] = {}  # one compile per config in this module


def first_step(cfg: Config) -> tuple[float, dict[str, np.ndarray], dict]:
    key = repr(cfg)
    if key not in _FIRST_STEPS:
        _FIRST_STEPS[key] = _first_step(cfg)
    return _FIRST_STEPS[key]


def _first_step(cfg: Config) -> tuple[float, dict[str, np.ndarray], dict]:
    run = build_run(cfg)
    local = next(run.data_iter)
    batch = global_batch(run.core.objective.batch_type, local, run.core.batch_shardings)
    _, metrics = run.step_fn(run.state, batch, run.rng)
    return float(metrics["loss"]), local, jax.device_get(metrics)


@pytest.mark.parametrize("packing", ["best_fit", "none"])
def test_sft_loss_equals_transformers_reference(packing: str, hf_model: tuple) -> None:
    hf_dir, model, data = hf_model
    loss, batch, metrics = first_step(sft_config(hf_dir, data, f"data.packing={packing}"))
    assert abs(loss - reference_loss(hf_dir, model, batch)) < 1e-4
    assert metrics["weight"] == batch["targets_weights"].sum()


def test_microbatches_and_mesh_layouts_give_the_same_loss(hf_model: tuple) -> None:
    hf_dir, _, data = hf_model
    base, batch, _ = first_step(sft_config(hf_dir, data, "data.packing=best_fit"))
    for overrides in (["mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"],
                      ["mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "train.grad_accum=2"]):
        loss, other, _ = first_step(sft_config(hf_dir, data, "data.packing=best_fit", *overrides))
        np.testing.assert_array_equal(other["inputs"], batch["inputs"])
        assert abs(loss - base) < 2e-5, overrides


def _cli_overrides(hf_dir: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    hf = model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))
    return ["tiny"] + [f"model.{k}={getattr(hf, k)}" for k in ("vocab_size", "d_model", "n_layers", "n_heads",
                                                              "n_kv_heads", "ffn_dim", "rope_theta", "norm_eps",
                                                              "tie_embeddings")] + [
        f"load_parameters_from={hf_dir}", "train.objective=sft", "data.source=jsonl", f"data.path={data}",
        f"data.tokenizer={hf_dir}", "data.example_format=messages", f"data.seq_len={SEQ}",
        "train.global_batch_size=8", f"run_dir={run_dir}", "--no-progress", *extra]


def test_maxlm_train_sft_end_to_end_and_bad_input(hf_model: tuple, tmp_path: Path, capsys) -> None:
    from maxlm.cli import main

    hf_dir, _, data = hf_model
    args = _cli_overrides(hf_dir, data, tmp_path / "run", "train.steps=8", "train.log_every=1", "optim.lr=0.01",
                          "optim.warmup_steps=1", "data.eval_fraction=0.25", "train.eval_every=8",
                          "train.eval_steps=1", "data.packing=best_fit")
    assert main(["train", *args]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] - 0.5
    assert all(r["trained_tokens"] > 0 and 0.5 < r["data_fill_rate"] <= 1 for r in train_rows)
    assert any("eval_loss" in r for r in rows)
    capsys.readouterr()

    bad = write_jsonl(tmp_path / "bad.jsonl", _rows()[:4] + [{"messages": [{"role": "bot", "content": "x"}]}] * 4)
    assert main(["train", *_cli_overrides(hf_dir, bad, tmp_path / "bad", "train.steps=1")]) == 2
    err = capsys.readouterr().err.strip()
    assert "data.max_bad_fraction=0.1" in err and "\n" not in err.split("maxlm: error:")[-1]

    tpl = tmp_path / "no_assistant.jinja"
    tpl.write_text("{% for m in messages %}{% if m['role'] != 'assistant' %}{{ m['content'] }}{% endif %}"
                   "{% endfor %}")
    assert main(["train", *_cli_overrides(hf_dir, data, tmp_path / "tpl", "train.steps=1",
                                          f"data.chat_template={tpl}")]) == 2
    err = capsys.readouterr().err
    assert f"maxlm: error: data.chat_template: {tpl} yields no assistant span" in err
