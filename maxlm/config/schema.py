"""The config schema: typed dataclasses of every key a user can set, and the names of pluggable choices.

`configs/base.yml` mirrors these defaults so a reader sees them in one file. This module imports nothing from
`maxlm.*` (nor jax): choices that name code (`model.ffn`, `train.objective`) are validated as names listed here, each
registry lives beside its code, and `tests/test_imports.py` checks that the two agree.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

class ConfigError(ValueError):
    """A user mistake in a config: the CLI prints its one-line message and exits with code 2."""


# The default logical-axis -> mesh-axis table. Parameters use the plain names; activations the `act_` ones, so
# that e.g. the `embed` dimension of a weight can live on `fsdp` while the batch of activations does too.
DEFAULT_RULES: list[list[Any]] = [
    ["act_batch", ["data", "fsdp", "expert"]],
    ["act_length", None],
    ["act_embed", None],
    ["act_heads", "tensor"],
    ["act_kv_heads", "tensor"],
    ["act_mlp", "tensor"],
    ["act_vocab", "tensor"],
    ["act_exp", "expert"],
    ["vocab", "tensor"],
    ["embed", "fsdp"],
    ["mlp", "tensor"],
    ["heads", "tensor"],
    ["kv_heads", "tensor"],
    ["head_dim", None],
    ["exp", "expert"],
    ["layers", None],
    ["norm", None],
]

MESH_AXES = ("data", "fsdp", "tensor", "expert")


# Names of the pluggable pieces; the registries beside the code (maxlm.model.ffn.FFN_BLOCKS,
# maxlm.train.objectives.OBJECTIVES, maxlm.model.remat.REMAT_POLICIES) must hold exactly these keys.
FFN_NAMES = ("mlp", "moe")
OBJECTIVE_NAMES = ("pretrain", "sft", "dpo", "reward")
HEAD_NAMES = ("lm", "scalar")
# maxlm.train.preference.LOSS_TYPES / REFERENCE_FREE are these.
PREFERENCE_LOSS_NAMES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "sppo_hard", "apo_zero",
                         "apo_down", "sigmoid_norm", "orpo", "simpo")
REFERENCE_FREE_NAMES = ("orpo", "simpo")
REFERENCE_MODES = ("frozen", "precomputed", "base", "none")  # base: the LoRA base without adapters
REMAT_NAMES = ("none", "full", "dots", "dots_no_batch")
# Projections an adapter can target by name (maxlm.model.lora.PROJECTION_NAMES must hold exactly these): attention
# q/k/v/o, the dense SwiGLU gate/up/down, and MoE shared experts. Anything else in `lora.targets` is a pattern.
LORA_TARGET_NAMES = ("q", "k", "v", "o", "gate", "up", "down", "shared_gate", "shared_up", "shared_down",
                     "expert_gate", "expert_up", "expert_down")  # expert_*: the routed experts' [E, in, out] weights


@dataclass
class ModelConfig:
    """Decoder shape and numerics. `ffn` names the feed-forward block plugged into every layer."""

    vocab_size: int = 32000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: d_model // n_heads
    ffn_dim: int = 11008
    ffn: str = "mlp"
    rope_theta: float = 10000.0
    # RoPE frequency scaling for long context (maxlm/model/rope.py; transformers' modeling_rope_utils.py):
    # none | linear | llama3 | yarn. Each type reads only its own parameters below.
    rope_scaling: str = "none"
    rope_factor: float = 1.0  # linear, llama3, yarn: context extension factor
    rope_original_max_positions: int = 0  # llama3, yarn: pretraining context (HF original_max_position_embeddings)
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_beta_fast: float = 32.0  # yarn: rotations above which a frequency is kept
    rope_beta_slow: float = 1.0  # yarn: rotations below which a frequency is interpolated
    rope_truncate: bool = True  # yarn: round the correction range to whole dimensions
    rope_mscale: float = 0.0  # yarn (DeepSeek): attention factor numerator scale (0: unused)
    rope_mscale_all_dim: float = 0.0  # yarn (DeepSeek): attention factor denominator scale (0: unused)
    rope_attention_factor: float = 0.0  # yarn: scales cos/sin; 0: 0.1 ln(factor) + 1 (or the mscale ratio)
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over head_dim on every query and key head, before RoPE (Qwen3)
    sliding_window: int = 0  # > 0: a token attends to itself and the previous sliding_window - 1 (Mistral)
    from_hf: str = ""  # a Hugging Face model directory: its config.json sets this section's architecture keys
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    dtype: str = "auto"  # compute dtype; auto: bf16 where bf16 matmuls are native, else f32 (model/precision.py)
    param_dtype: str = "float32"
    attention: str = "auto"  # auto | xla | cudnn
    scan_layers: bool = True
    remat: str = "none"  # none | full | dots | dots_no_batch
    head: str = "lm"  # lm (next-token logits) | scalar (a reward model's score at the last token; no LM head)
    # ---- Mixture-of-Experts (used when ffn == "moe"; maxlm/model/moe.py) ----
    num_experts: int = 8  # routed experts per MoE layer
    experts_per_token: int = 2  # top-k
    moe_ffn_dim: int = 0  # hidden size of each routed (and shared) expert; 0: ffn_dim
    shared_experts: int = 0  # always-on experts of width moe_ffn_dim (DeepSeekMoE), added to the routed output
    first_dense_layers: int = 0  # the first N layers keep the dense `mlp` block (DeepSeek-V3: 3)
    moe_layer_interval: int = 1  # after those, every Nth layer is MoE (the others dense): 1 = all, 2 = alternate
    router_scoring: str = "softmax"  # softmax (Mixtral) | sigmoid (DeepSeek-V3, with a selection-only bias)
    router_renormalize: bool = True  # divide the top-k weights by their sum (Mixtral, DeepSeek-V3)
    router_scale: float = 1.0  # multiplies the routed experts' weights (DeepSeek-V3 routed_scaling_factor: 2.5)
    router_bias_rate: float = 0.001  # sigmoid: bias step gamma of DeepSeek-V3's auxiliary-loss-free balancing
    router_jitter: float = 0.0  # training only: router input * U(1 - eps, 1 + eps) (Switch Transformer)
    capacity_factor: float = 0.0  # <= 0: dropless (sort + grouped matmul); > 0: slots per expert per sequence
    # dropless grouped matmul: ragged_dot | tiled | blocked | auto (tiled on CPU, blocked on GPU, TPU ragged_dot)
    moe_matmul: str = "auto"
    load_balance_coef: float = 0.01  # Switch/Mixtral E * sum_e f_e P_e, averaged over MoE layers
    router_z_coef: float = 0.0  # ST-MoE router z-loss mean(logsumexp(logits)^2), averaged over MoE layers
    moe_expert_metrics: bool = True  # log every expert's token fraction per layer (else per-layer summaries only)

    def layer_is_moe(self, i: int) -> bool:
        """Whether layer i (0-based) has the MoE block: after `first_dense_layers` dense layers, the last layer of
        every run of `moe_layer_interval` (interval 2: dense, MoE, dense, MoE, ...; a trailing partial run is dense).
        Defined here once so the model, the parameter/FLOP counter and the planner agree on it."""
        if self.ffn != "moe" or i < self.first_dense_layers:
            return False
        return (i - self.first_dense_layers + 1) % self.moe_layer_interval == 0

    @property
    def head_dim_resolved(self) -> int:
        """The one spelling of the per-head width: `head_dim`, or d_model // n_heads when it is 0."""
        return self.head_dim or self.d_model // self.n_heads

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.layer_is_moe(i)]

    @property
    def num_moe_layers(self) -> int:
        """len(moe_layers) in closed form (the planner counts parameters of thousands of shapes)."""
        if self.ffn != "moe":
            return 0
        return max(self.n_layers - self.first_dense_layers, 0) // self.moe_layer_interval


@dataclass
class MeshConfig:
    """Device mesh sizes (one may be -1: filled from the device count) and the logical-axis rules."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1
    # Multi-slice (DCN x ICI): sizes of each axis across slices; the ICI sizes above are per slice.
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_expert: int = 1
    rules: list = field(default_factory=lambda: [list(r) for r in DEFAULT_RULES])


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed into rows."""

    source: str = "synthetic"  # synthetic | text | jsonl | parquet | arrayrecord (single-source shorthand)
    path: str = ""  # glob (comma-separated globs allowed) for the single source
    text_field: str = "text"  # JSONL field / Parquet column holding the document
    text_split: str = "file"  # text files: file (one document each) | blank_line (blank-line-separated documents)
    # Weighted sources: [{name, path, weight, format, text_field, text_split, stage_weights, max_files}, ...]
    # (validated into maxlm.config.data_spec.MixtureComponent); replaces source/path when non-empty.
    mixture: list = field(default_factory=list)
    stage_starts: list = field(default_factory=list)  # fractions of train.steps where stages 1, 2, ... begin
    tokenizer: str = ""  # sentencepiece .model path or Hugging Face tokenizer directory (a cache carries its own copy)
    # SFT rows (maxlm.data.sft): text (pretraining documents) | prompt_completion | messages | alpaca
    example_format: str = "text"
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    messages_field: str = "messages"
    chat_template: str = "auto"  # auto (tokenizer's own, else chatml) | tokenizer | chatml | path to a .jinja file
    loss_on: str = "assistant"  # completion | assistant | all: which tokens of an SFT example are trained
    truncation: str = "drop"  # over-long SFT examples: drop | left (cut the prompt from the left, keep the response)
    cache_dir: str = ""  # pre-tokenized cache written by `maxlm data prepare`; when set, training reads it
    seq_len: int = 128
    shuffle_seed: int = 0
    packing: str = "first_fit"  # first_fit | best_fit | none (one example per row, padded)
    add_bos: bool = True
    add_eos: bool = True
    num_workers: int = 0  # grain multiprocessing prefetch workers (0: in-process)
    max_files: int = 0  # 0: all files matched by `path`
    eval_fraction: float = 0.0  # documents held out for eval, chosen by document hash
    min_doc_chars: int = 0  # cleaning: drop shorter documents
    max_doc_chars: int = 0  # cleaning: drop longer documents (0: no limit)
    max_non_text_ratio: float = 1.0  # cleaning: drop documents with more control/replacement chars (1: off)
    max_bad_fraction: float = 0.1  # unreadable/malformed items above this fraction stop the run
    prepare_workers: int = 0  # processes for `maxlm data prepare` (0: one per CPU core)
    resume: str = "exact"  # exact: refuse to resume onto other processes/workers/sources | reshuffle: new order
    # Independent pipelines the global batch's rows are split into; fixed, so the rows do not depend on the number
    # of processes (each process builds only the shards holding its rows). Set >= the process count at scale.
    shards: int = 1
    # ---- preference pairs (example_format preference; train.objective dpo | reward; maxlm/data/preference.py) ----
    chosen_field: str = "chosen"  # the preferred response (a string, or an assistant message / list of them)
    rejected_field: str = "rejected"  # the dispreferred response
    margin_field: str = "margin"  # optional per-pair reward margin (reward models); "" ignores it
    pairs_per_row: int = 8  # packed: at most this many pairs share one row


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine / WSD / constant, global-norm clipping and a decay mask."""

    lr: float = 3e-4
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # Parameter leaf names never decayed (matched against the last path element): norms, embeddings, biases.
    no_decay: list = field(default_factory=lambda: ["scale", "embedding", "q_bias", "k_bias", "v_bias"])
    clip_norm: float = 1.0  # <= 0: no clipping


@dataclass
class CheckpointConfig:
    """When and where the train state is saved, and how long checkpoints are kept."""

    dir: str = ""  # "": {run_dir}/checkpoints; a local path or any URL orbax/tensorstore accept (gs://...)
    every: int = 1000  # save every N steps and always at the end; 0: only at the end
    keep_last: int = 3  # the newest N checkpoints are kept
    keep_every: int = 0  # a checkpoint whose step is a multiple of this is kept forever (0: none)
    async_save: bool = True  # write in the background while training goes on



@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) on chosen projections; the base weights are frozen (maxlm/model/lora.py)."""

    enabled: bool = False
    rank: int = 8  # r: A is [in, r], B is [r, out]
    alpha: float = 16.0  # scale alpha / r (or alpha / sqrt(r) with rslora)
    # Projection names (LORA_TARGET_NAMES) or regular expressions searched in a weight's path (`layers/attn/q`).
    targets: list = field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"])
    dropout: float = 0.0  # dropout on the adapter's input during training (PEFT's lora_dropout)
    rslora: bool = False  # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski 2023)
    base_dtype: str = ""  # dtype the frozen base is held in: '' (model.param_dtype) | float32 | bfloat16
    load_adapter_from: str = ""  # start the adapters from a PEFT adapter directory or a maxlm LoRA checkpoint


@dataclass
class TrainConfig:
    """The loop: how long, how big a batch, which objective, what to log."""

    steps: int = 1000
    global_batch_size: int = 8  # rows per optimizer step, across all devices and microbatches
    grad_accum: int = 1
    objective: str = "pretrain"
    z_loss: float = 0.0
    log_every: int = 10
    hardware: str = "auto"  # peak-FLOP table key for MFU; auto: from the device kind
    compile_cache_dir: str = ""  # persistent XLA compilation cache ("" = off): restarts skip recompiling
    max_nonfinite_steps: int = 3  # consecutive NaN/Inf steps (skipped, not applied) before the run stops
    eval_every: int = 0  # evaluate on the held-out split every N steps (0: never)
    eval_steps: int = 10  # batches per evaluation


@dataclass
class GenerateConfig:
    """Decoding (`maxlm generate`, `maxlm eval`): the context, batching and the defaults of the sampling flags."""

    max_length: int = 0  # prompt + completion tokens at most; 0: data.seq_len
    batch_size: int = 32  # prompts decoded together (rounded up to a multiple of the data-parallel size)
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    seed: int = 0  # sampling seed: a prompt's is generate.seed + its index, unless its line sets "seed"
    stop: list = field(default_factory=list)  # strings that end a completion

    def resolved_max_length(self, seq_len: int) -> int:
        return self.max_length or seq_len


@dataclass
class DpoConfig:
    """Direct preference optimisation and its variants (maxlm/train/preference.py has every formula)."""

    loss_type: Any = "sigmoid"  # one name, or a list mixed by loss_weights (TRL's names)
    loss_weights: list = field(default_factory=list)  # one per loss_type entry; empty: all 1
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO / robust / exo_pair epsilon, in [0, 0.5)
    sft_weight: float = 0.0  # adds this x the chosen responses' per-token NLL
    simpo_gamma: float = 0.5  # SimPO's target reward margin
    reference: str = "frozen"  # frozen | precomputed | base (LoRA) | none (reference-free losses: orpo, simpo)
    reference_from: str = ""  # reference weights: a maxlm checkpoint or HF directory; "": the starting weights


@dataclass
class RewardConfig:
    """Reward models (train.objective: reward): Bradley-Terry on a scalar head."""

    center_rewards_coef: float = 0.0  # adds coef x mean((r_chosen + r_rejected)^2) (Eisenstein et al. 2023)


@dataclass
class Config:
    """The whole resolved configuration of one run."""

    run_dir: str = "runs/default"
    seed: int = 0
    load_parameters_from: str = ""  # initialise params (not optimizer/step) from a maxlm checkpoint or HF directory
    model: ModelConfig = field(default_factory=ModelConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    # ---- derived values: computed here and nowhere else ----
    @property
    def micro_batch_size(self) -> int:
        return self.train.global_batch_size // self.train.grad_accum

    @property
    def tokens_per_step(self) -> int:
        return self.train.global_batch_size * self.data.seq_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
