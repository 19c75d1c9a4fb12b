"""An lm-evaluation-harness model backed by maxlm (`pip install 'maxlm[lm-eval]'`), so the harness's tasks run
through maxlm's scorer and decoder:

    import lm_eval
    from maxlm.eval.lm_eval_adapter import MaxlmLM
    lm_eval.simple_evaluate(model=MaxlmLM("configs/models/tiny.yml", overrides="load_parameters_from=runs/x"),
                            tasks=["hellaswag"])

or on the command line `lm_eval --model maxlm --model_args config=tiny,overrides="load_parameters_from=runs/x"`
after `import maxlm.eval.lm_eval_adapter` registers the name. Semantics follow the harness's Hugging Face model
(lm_eval/models/huggingface.py): continuations split from contexts by `_encode_pair` (here
maxlm.eval.scoring.split_continuation), a context gets bos first when data.add_bos is set (maxlm models are trained
that way; an empty context is bos alone), rolling log-likelihoods score disjoint windows of the model's length with
the bos (else eos) as the first window's prefix, and generation stops at the request's `until` strings or
`max_gen_toks` tokens.
"""

from __future__ import annotations

from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from maxlm.config import ConfigError, load_config, resolve_config_path
from maxlm.eval.scoring import Scorer, split_continuation
from maxlm.generate.cli import make_engine
from maxlm.generate.engine import Request
from maxlm.generate.load import load_model, load_tokenizer_for
from maxlm.generate.sampling import SamplingParams

DEFAULT_GEN_TOKENS = 256


@register_model("maxlm")
class MaxlmLM(LM):
    """`config`: a YAML path or preset; `overrides`: space-separated key=value pairs (weights, tokenizer, ...)."""

    def __init__(self, config: str, overrides: str = "", batch_size: int | str | None = None, **_: Any) -> None:
        super().__init__()
        extra = [f"generate.batch_size={int(batch_size)}"] if str(batch_size or "").isdigit() else []
        self.cfg = load_config(resolve_config_path(config), overrides.split() + extra)
        self.tokenizer = load_tokenizer_for(self.cfg)
        if self.tokenizer is None:
            raise ConfigError("the lm-eval adapter needs a tokenizer; set data.tokenizer")
        self.loaded = load_model(self.cfg)
        self.max_length = self.cfg.generate.resolved_max_length(self.cfg.data.seq_len)
        self.scorer = Scorer(self.loaded, self.cfg.generate.batch_size, self.max_length)
        self.engine = make_engine(self.loaded, self.tokenizer)
        bos = self.tokenizer.bos_id
        self.prefix_id = bos if bos is not None else self.tokenizer.eos_id
        self.head = [bos] if self.cfg.data.add_bos and bos is not None else []

    def _context_ids(self, ids: list[int]) -> list[int]:
        return (self.head + ids) or [self.prefix_id]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context:
                ctx, cont = split_continuation(self.tokenizer.encode, context, continuation)
            else:
                ctx, cont = [], list(self.tokenizer.encode(continuation))
            pairs.append((self._context_ids(ctx), cont))
        return self.scorer.loglikelihood(pairs)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in get_rolling_token_windows(list(self.tokenizer.encode(text)), self.prefix_id, self.max_length,
                                               context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self.scorer.loglikelihood(windows)):
            totals[i] += ll
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        seed = self.cfg.generate.seed
        reqs = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0.0) > 0:
                sampling = SamplingParams(temperature=float(kwargs.get("temperature") or 1.0),
                                          top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0),
                                          seed=seed)
            else:  # the harness's default: greedy
                sampling = SamplingParams(seed=seed)
            ids = self._context_ids(list(self.tokenizer.encode(context)))
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_GEN_TOKENS))
            budget = self.max_length - max_new
            reqs.append(Request(ids[-max(budget, 1):], max_new, sampling, tuple(s for s in until if s)))
        return [c.text or "" for c in self.engine.generate(reqs)]
