"""Model configuration and the named presets (Llama-2/3, Qwen2, Mixtral, Qwen2-MoE)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import gin

from llmjax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style rotary frequency scaling (`rope_type: llama3` in HF configs)."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


HEADS = ("lm", "score")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  The shape fields (everything except `dtype`) define the checkpoint; `dtype` is the compute
  dtype and may change between runs. Parameters are always stored in `param_dtype`.
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  head_dim: int | None = None  # None: d_model // n_heads
  rope_theta: float = 10_000.0
  rope_scaling: RopeScaling | None = None
  norm_eps: float = 1e-5
  qkv_bias: bool = False  # Qwen2 has a bias on q, k and v projections.
  tie_embeddings: bool = False
  # What the model outputs: 'lm' next-token logits (an `lm_head`, or the tied embedding), or
  # 'score' one scalar per position from a `score [d_model, 1]` projection and no lm_head: a
  # reward model (HF *ForSequenceClassification with num_labels=1).
  head: str = "lm"
  max_seq_len: int = 2048
  init_std: float = 0.02
  # Compute dtype: float32, bfloat16, or float16 (GPUs; trained with loss scaling, see
  # llmjax/train/loss_scale.py). Parameters stay in param_dtype, the master copy.
  dtype: str = "float32"
  param_dtype: str = "float32"  # float32 or bfloat16
  # How the forward pass is computed; none of these change the parameters.
  attention: str = "xla"  # xla | dot_product (cuDNN flash on GPU) | splash (Pallas, TPU)
  remat: str = "none"  # none | full | dots | dots_no_batch: what each block saves for backward
  scan_layers: bool = False  # lax.scan over the blocks: one block to compile, not n_layers
  # Mixture of experts (llmjax/model/moe.py). n_experts 0: every block has the dense SwiGLU
  # MLP of width d_ff. n_experts > 0: every block's MLP is n_experts SwiGLU experts of width
  # d_ff_expert (None: d_ff), each token routed to its top n_experts_per_token by a softmax
  # router (Mixtral, Qwen2-MoE); optionally plus a shared dense expert of width d_ff_shared
  # that every token passes through, scaled by a sigmoid gate with shared_expert_gate
  # (Qwen2-MoE). norm_topk_prob renormalises the top-k router weights to sum to 1 (Mixtral;
  # Qwen1.5-MoE does not).
  n_experts: int = 0
  n_experts_per_token: int = 2
  d_ff_expert: int | None = None
  d_ff_shared: int = 0
  shared_expert_gate: bool = False
  norm_topk_prob: bool = True
  # MoE numerics (not in the checkpoint's shape): 0 routes every token to all its experts
  # (dropless); > 0 gives each expert ceil(factor * tokens * top_k / n_experts) slots per
  # forward pass and drops the assignments that overflow them. The router losses are added
  # to the training loss times these coefficients: Switch load balancing (Fedus et al. 2021,
  # as transformers' load_balancing_loss_func) and ST-MoE's z-loss (Zoph et al. 2022).
  moe_capacity_factor: float = 0.0
  router_aux_loss_coef: float = 0.01
  router_z_loss_coef: float = 0.0

  def __post_init__(self):
    problems = []
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
                 "max_seq_len"):
      if getattr(self, name) <= 0:
        problems.append(f"{name} must be positive, got {getattr(self, name)}")
    if self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads:
      problems.append(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads "
                      f"({self.n_kv_heads}) for grouped-query attention")
    if self.head_dim is None and self.n_heads > 0 and self.d_model % self.n_heads:
      problems.append(f"d_model ({self.d_model}) is not divisible by n_heads ({self.n_heads}); "
                      "set head_dim explicitly")
    if self.resolved_head_dim % 2:
      problems.append(f"head_dim ({self.resolved_head_dim}) must be even for rotary embeddings")
    choices = {"head": HEADS, "attention": ("xla", "dot_product", "splash"),
               "remat": ("none", "full", "dots", "dots_no_batch")}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        problems.append(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.dtype not in COMPUTE_DTYPES:
      problems.append(f"dtype must be one of {COMPUTE_DTYPES}, got {self.dtype!r}")
    if self.param_dtype == "float16":
      problems.append("param_dtype 'float16' is not supported: float16 parameters lose the "
                      "small updates of late training and overflow; keep float32 parameters "
                      "(the master weights) with dtype='float16' compute")
    elif self.param_dtype not in ("float32", "bfloat16"):
      problems.append(f"param_dtype must be 'float32' or 'bfloat16', got {self.param_dtype!r}")
    problems += self._moe_problems()
    if problems:
      raise ConfigError("invalid ModelConfig: " + "; ".join(problems))

  def _moe_problems(self) -> list[str]:
    if self.n_experts < 0:
      return [f"n_experts must be >= 0 (0: a dense MLP), got {self.n_experts}"]
    if self.n_experts == 0:
      moe_only = {"d_ff_expert": None, "d_ff_shared": 0, "shared_expert_gate": False,
                  "moe_capacity_factor": 0.0}
      set_ = [k for k, default in moe_only.items() if getattr(self, k) != default]
      return [f"{', '.join(set_)} only apply to a mixture of experts: set n_experts > 0, or "
              "leave them at their defaults"] if set_ else []
    problems = []
    if not 1 <= self.n_experts_per_token <= self.n_experts:
      problems.append(f"n_experts_per_token (top-k) must be between 1 and n_experts "
                      f"({self.n_experts}), got {self.n_experts_per_token}")
    if self.d_ff_expert is not None and self.d_ff_expert <= 0:
      problems.append(f"d_ff_expert must be positive (or None: d_ff), got {self.d_ff_expert}")
    if self.d_ff_shared < 0:
      problems.append(f"d_ff_shared must be >= 0 (0: no shared expert), got {self.d_ff_shared}")
    if self.shared_expert_gate and self.d_ff_shared == 0:
      problems.append("shared_expert_gate gates the shared expert, and d_ff_shared is 0 (there "
                      "is none): set d_ff_shared > 0 or shared_expert_gate False")
    for name in ("moe_capacity_factor", "router_aux_loss_coef", "router_z_loss_coef"):
      if not getattr(self, name) >= 0:
        problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
    return problems

  @property
  def resolved_d_ff_expert(self) -> int:
    return self.d_ff_expert if self.d_ff_expert is not None else self.d_ff

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim if self.head_dim is not None else self.d_model // max(self.n_heads, 1)

  def num_params(self, include_embeddings: bool = True) -> int:
    """Exact parameter count of the model this config builds (every expert of an MoE)."""
    return self._count_params(self.n_experts, include_embeddings)

  def num_active_params(self, include_embeddings: bool = True) -> int:
    """The parameters one token computes with: `num_params` counting only its top-k experts
    in each MoE layer (the router and the shared expert, which every token uses, count
    whole). Equals `num_params` for a dense model. The embeddings count whole, as the
    published active counts of Mixtral and Qwen-MoE do."""
    return self._count_params(self.n_experts_per_token if self.n_experts else 0,
                              include_embeddings)

  def _count_params(self, experts: int, include_embeddings: bool) -> int:
    """The model's parameters, counting `experts` of each MoE layer's experts."""
    d, hd = self.d_model, self.resolved_head_dim
    attn = d * hd * (self.n_heads + 2 * self.n_kv_heads) + self.n_heads * hd * d
    if self.qkv_bias:
      attn += hd * (self.n_heads + 2 * self.n_kv_heads)
    if self.n_experts:
      mlp = (experts * 3 * d * self.resolved_d_ff_expert + d * self.n_experts  # + router
             + 3 * d * self.d_ff_shared + (d if self.shared_expert_gate else 0))
    else:
      mlp = 3 * d * self.d_ff
    per_layer = attn + mlp + 2 * d
    total = self.n_layers * per_layer + d
    if self.head == "score":
      total += d  # score [d_model, 1]; the embedding is the only vocab matrix
    if include_embeddings:
      untied_lm_head = self.head == "lm" and not self.tie_embeddings
      total += self.vocab_size * d * (2 if untied_lm_head else 1)
    return total

  def shape_dict(self) -> dict[str, Any]:
    """The fields that must match between a checkpoint and the model restoring it."""
    d = dataclasses.asdict(self)
    for numerics_only in ("dtype", "init_std", "max_seq_len", "attention", "remat",
                          "scan_layers", "moe_capacity_factor", "router_aux_loss_coef",
                          "router_z_loss_coef"):
      d.pop(numerics_only)
    return d

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)  # checkpoints written before `head` existed lack it: the default, 'lm'
    if d.get("rope_scaling") is not None:
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)


def check_dtype_on_backend(cfg: ModelConfig, backend: str | None = None) -> None:
  """Refuses a compute dtype the backend (default: JAX's) has no fast path for.

  TPUs compute in bfloat16 natively and have no float16 matmul path: ConfigError before any
  compile. XLA:CPU runs float16 (slowly, by converting): allowed, with a warning, for tests.
  """
  if cfg.dtype != "float16":
    return
  import jax
  from absl import logging
  backend = backend or jax.default_backend()
  if backend == "tpu":
    raise ConfigError("ModelConfig.dtype='float16' is not supported on TPU, which has no fast "
                      "float16 path: use dtype='bfloat16' (the TPU's native compute type; it "
                      "needs no loss scaling)")
  if backend == "cpu":
    logging.log_first_n(logging.WARNING, "ModelConfig.dtype='float16' on CPU: XLA:CPU converts "
                        "float16 math and runs slower than float32; fine for tests, use a GPU "
                        "for speed", 1)


PRESETS: dict[str, ModelConfig] = {
    # CPU tests and the default experiment: minutes on a laptop.
    "tiny": ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                        d_ff=384, rope_theta=10_000.0, max_seq_len=512),
    # ~110M parameters: the CPU throughput benchmark's mid-size model.
    "llama_100m": ModelConfig(vocab_size=32_000, d_model=768, n_layers=12, n_heads=12,
                              n_kv_heads=4, d_ff=2048, rope_theta=10_000.0, max_seq_len=2048),
    # Llama-3.2-1B (meta-llama/Llama-3.2-1B config.json).
    "llama3_1b": ModelConfig(vocab_size=128_256, d_model=2048, n_layers=16, n_heads=32,
                             n_kv_heads=8, d_ff=8192, head_dim=64, rope_theta=500_000.0,
                             rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), norm_eps=1e-5,
                             tie_embeddings=True, max_seq_len=131_072),
    # Llama-3-8B (meta-llama/Meta-Llama-3-8B config.json).
    "llama3_8b": ModelConfig(vocab_size=128_256, d_model=4096, n_layers=32, n_heads=32,
                             n_kv_heads=8, d_ff=14_336, rope_theta=500_000.0, norm_eps=1e-5,
                             max_seq_len=8192),
    # Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B config.json).
    "qwen2_5_0_5b": ModelConfig(vocab_size=151_936, d_model=896, n_layers=24, n_heads=14,
                                n_kv_heads=2, d_ff=4864, head_dim=64, rope_theta=1_000_000.0,
                                norm_eps=1e-6, qkv_bias=True, tie_embeddings=True,
                                max_seq_len=32_768),
    # CPU tests and the MoE bench: tiny's shape with 8 experts of width 128, top-2.
    "tiny_moe": ModelConfig(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                            d_ff=384, d_ff_expert=128, n_experts=8, n_experts_per_token=2,
                            rope_theta=10_000.0, max_seq_len=512),
    # Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): 46.7B parameters, 12.9B active.
    "mixtral_8x7b": ModelConfig(vocab_size=32_000, d_model=4096, n_layers=32, n_heads=32,
                                n_kv_heads=8, d_ff=14_336, n_experts=8, n_experts_per_token=2,
                                rope_theta=1_000_000.0, norm_eps=1e-5, max_seq_len=32_768,
                                router_aux_loss_coef=0.02),
    # Qwen1.5-MoE-A2.7B (Qwen/Qwen1.5-MoE-A2.7B config.json): 60 experts of width 1408, top-4
    # without renormalisation, a gated shared expert of width 5632; 14.3B parameters, 2.7B
    # active.
    "qwen1_5_moe_a2_7b": ModelConfig(vocab_size=151_936, d_model=2048, n_layers=24, n_heads=16,
                                     n_kv_heads=16, d_ff=5632, n_experts=60,
                                     n_experts_per_token=4, d_ff_expert=1408, d_ff_shared=5632,
                                     shared_expert_gate=True, norm_topk_prob=False,
                                     rope_theta=1_000_000.0, norm_eps=1e-6, qkv_bias=True,
                                     max_seq_len=8192, router_aux_loss_coef=0.001),
}


@gin.configurable
def model_config(preset: str = "tiny", overrides: dict[str, Any] | None = None) -> ModelConfig:
  """A preset with field overrides, e.g. `model_config.overrides = {'n_layers': 4}` in gin."""
  if preset not in PRESETS:
    raise ConfigError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
  overrides = dict(overrides or {})
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"model_config.overrides has unknown field(s) {unknown}; "
                      f"valid fields are {sorted(fields)}")
  if isinstance(overrides.get("rope_scaling"), dict):
    overrides["rope_scaling"] = RopeScaling(**overrides["rope_scaling"])
  return dataclasses.replace(PRESETS[preset], **overrides)
