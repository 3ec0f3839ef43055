"""LoRA adapters: `W x + s * B A x` with W frozen and only A, B trained (Hu et al., 2021).

An adapter is a small module stored beside the weight it adapts (`attn.q_proj` gets
`attn.q_proj_lora` with `a [*d_in, r]` and `b [r, *d_out]`), whose variables are
`nnx.LoRAParam`s carrying logical axes, so the mesh rules shard them like the weight and the
train loop's `trainable=nnx.LoRAParam` filter trains them alone. The model reads a weight
through `weight(owner, name)`, which hands `project()` a `LoraTensor` (base + adapter) when
an adapter is there; `project()` dispatches on it as it does on a quantized weight. The
base may be a float array or a `QuantizedTensor` (QLoRA: an NF4/int4 base through the int4
kernel, LoRA on top).

Conventions follow peft, so adapters move between the two unchanged: A is initialized
Kaiming-uniform (bound 1/sqrt(d_in)), B at zero (a fresh adapter leaves the model as it was);
the scale is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski, 2023); dropout applies
to the adapter's input only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llmjax.errors import ConfigError
from llmjax.kernels import lora_matmul
from llmjax.model import router_losses, weights
from llmjax.model.matmul import CHECKPOINT_NAME, contracted_axes

TARGET_MODULES = weights.ATTENTION + weights.MLP + ("lm_head",)
KERNELS = ("auto", "pallas", "xla")
RANK_AXIS = "lora_rank"  # never sharded: r is small


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which weights get adapters, their size, and how they run.

  Attributes:
    rank: r, the adapters' inner dimension.
    alpha: the scale numerator: s = alpha / r (alpha / sqrt(r) with `use_rslora`).
    dropout: dropout on the adapter's input during training (peft's lora_dropout).
    target_modules: any of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj,
      lm_head (peft's names).
    use_rslora: rank-stabilized scale alpha / sqrt(r).
    kernel: 'pallas' (the fused `lora_matmul` kernel; interpret mode on CPU), 'xla' (base
      matmul plus two small ones), or 'auto': pallas on GPU/TPU, xla on CPU. A quantized
      base, or dropout > 0, runs the low-rank path apart from the base matmul either way.
    quantize_base: QLoRA: quantize the frozen base (e.g. `@QuantConfig()` with scheme nf4)
      when the run starts; None keeps it in float.
    seed: initialization of A.
  """
  rank: int = 16
  alpha: float = 32.0
  dropout: float = 0.0
  target_modules: Sequence[str] = weights.ATTENTION + weights.MLP
  use_rslora: bool = False
  kernel: str = "auto"
  quantize_base: Any = None  # llmjax.model.quant.QuantConfig | None
  seed: int = 0

  def __post_init__(self):
    object.__setattr__(self, "target_modules", tuple(self.target_modules))
    problems = []
    unknown = [t for t in self.target_modules if t not in TARGET_MODULES]
    if unknown:
      problems.append(f"target_modules {unknown} unknown; valid names are "
                      f"{', '.join(TARGET_MODULES)}")
    if not self.target_modules:
      problems.append("target_modules is empty: name at least one of "
                      f"{', '.join(TARGET_MODULES)}")
    if self.rank < 1:
      problems.append(f"rank must be at least 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      problems.append(f"dropout must be in [0, 1), got {self.dropout}")
    if self.kernel not in KERNELS:
      problems.append(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
    if problems:
      raise ConfigError("invalid LoraConfig: " + "; ".join(problems))

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  def resolved_kernel(self) -> str:
    if self.kernel != "auto":
      return self.kernel
    return "xla" if jax.default_backend() == "cpu" else "pallas"

  def to_dict(self) -> dict[str, Any]:
    """JSON-able, for checkpoint metadata (`from_dict` reads it back)."""
    d = dataclasses.asdict(self)
    d["target_modules"] = list(self.target_modules)
    if self.quantize_base is not None:
      d["quantize_base"] = dataclasses.asdict(self.quantize_base)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "LoraConfig":
    d = dict(d)
    if d.get("quantize_base") is not None:
      from llmjax.model.quant import QuantConfig
      d["quantize_base"] = QuantConfig(**d["quantize_base"])
    return cls(**d)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "a", "b"],
                   meta_fields=["scale", "dropout", "kernel"])
@dataclasses.dataclass(frozen=True)
class LoraTensor:
  """A weight with its adapter, as `project()` receives it.

  Attributes:
    base: the frozen weight `[*d_in, *d_out]`, float or a `quant.QuantizedTensor`.
    a: `[*d_in, r]`; b: `[r, *d_out]`.
  """
  base: Any
  a: jax.Array
  b: jax.Array
  scale: float
  dropout: float
  kernel: str


class LoraAdapter(nnx.Module):
  """The trainable pair (A, B) of one weight."""

  def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
               in_axes: tuple[str, ...], out_axes: tuple[str, ...], cfg: LoraConfig,
               key: jax.Array, dtype):
    r, d_in = cfg.rank, math.prod(in_shape)
    # peft: kaiming_uniform_(a=sqrt(5)) on the [r, d_in] Linear weight -> U(+-1/sqrt(d_in)).
    bound = 1.0 / math.sqrt(d_in)
    a = jax.random.uniform(key, in_shape + (r,), jnp.float32, -bound, bound).astype(dtype)
    self.a = nnx.LoRAParam(a, logical_axes=in_axes + (RANK_AXIS,))
    self.b = nnx.LoRAParam(jnp.zeros((r,) + out_shape, dtype),
                           logical_axes=(RANK_AXIS,) + out_axes)
    self.scale = cfg.scale
    self.dropout = cfg.dropout
    self.kernel = cfg.resolved_kernel()

  def attach(self, base: Any) -> LoraTensor:
    return LoraTensor(base, self.a[...], self.b[...], self.scale, self.dropout, self.kernel)


# ---- Trace-time switches: adapters off (the reference model), dropout randomness ------------
_local = threading.local()


@contextlib.contextmanager
def adapters_disabled():
  """Inside, the model runs its base weights alone: a LoRA policy's reference model."""
  previous = getattr(_local, "disabled", False)
  _local.disabled = True
  try:
    yield
  finally:
    _local.disabled = previous


@contextlib.contextmanager
def dropout_key(key: jax.Array | None):
  """Inside (while tracing a training step), adapters with dropout > 0 draw masks from `key`.

  Each adapter call folds in its own trace-order index, so adapters differ; outside, dropout
  is off (evaluation, sampling).
  """
  previous = getattr(_local, "key", None), getattr(_local, "calls", 0)
  _local.key, _local.calls = key, 0
  try:
    yield
  finally:
    _local.key, _local.calls = previous


@contextlib.contextmanager
def fold_dropout_key(index: jax.Array):
  """Folds `index` (a traced layer number under `lax.scan`) into the active dropout key."""
  previous = getattr(_local, "key", None)
  _local.key = None if previous is None else jax.random.fold_in(previous, index)
  try:
    yield
  finally:
    _local.key = previous


def adapters_are_disabled() -> bool:
  return getattr(_local, "disabled", False)


def weight(owner: nnx.Module, name: str) -> Any:
  """`owner.<name>[...]`, with its adapter attached when it has one (and adapters are on)."""
  w = getattr(owner, name)[...]
  adapter = getattr(owner, name + "_lora", None)
  if adapter is None or adapters_are_disabled():
    return w
  return adapter.attach(w)


def _dropout(x: jax.Array, rate: float) -> jax.Array:
  key = getattr(_local, "key", None)
  if rate == 0.0 or key is None:
    return x
  _local.calls += 1
  keep = jax.random.bernoulli(jax.random.fold_in(key, _local.calls), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def lora_project(x: jax.Array, w: LoraTensor, spec: str, dtype, out_dtype=None,
                 base_project=None) -> jax.Array:
  """`einsum(spec, x, base) + s * (dropout(x) @ A) @ B`, gradients to x, A and B only.

  `base_project(x, base, spec, dtype)` computes the base term when the fused kernel does not
  apply (a quantized base goes through the int4 kernel there).
  """
  n_in = contracted_axes(spec)
  out_dtype = jnp.dtype(out_dtype or dtype)
  lead, d_in_shape = x.shape[:x.ndim - n_in], x.shape[x.ndim - n_in:]
  out_shape = w.b.shape[1:]
  d_in, d_out, r = math.prod(d_in_shape), math.prod(out_shape), w.a.shape[-1]
  x2 = x.reshape(-1, d_in).astype(dtype)
  a2, b2 = w.a.reshape(d_in, r), w.b.reshape(r, d_out)
  if w.kernel == "pallas" and w.dropout == 0.0 and isinstance(w.base, jax.Array):
    y = lora_matmul(x2, jax.lax.stop_gradient(w.base).reshape(d_in, d_out).astype(dtype),
                    a2.astype(dtype), b2.astype(dtype), w.scale)
    # Named like weight_matmul's outputs, so the 'dots' remat policies keep it rather than
    # rerunning the kernel in the backward pass (a pallas_call is not a dot to them).
    y = checkpoint_name(y, CHECKPOINT_NAME)
    return y.astype(out_dtype).reshape(*lead, *out_shape)
  base = base_project(x, jax.lax.stop_gradient(w.base), spec, dtype)
  xa = jnp.dot(_dropout(x2, w.dropout), a2.astype(dtype), preferred_element_type=jnp.float32)
  low = jnp.dot(xa, b2.astype(jnp.float32), preferred_element_type=jnp.float32)
  return (base.astype(jnp.float32) + w.scale * low.reshape(*lead, *out_shape)).astype(out_dtype)


# ---- Model surgery ----------------------------------------------------------------------


def _base_shape(owner: nnx.Module, attr: str) -> tuple[int, ...]:
  """The full shape of a (possibly quantized) weight."""
  return tuple(getattr(owner, attr).get_value().shape)


def add_lora(model: nnx.Module, cfg: LoraConfig) -> nnx.Module:
  """Adds an adapter beside every weight `cfg.target_modules` names, in place; returns model.

  Works on a concrete model and under `nnx.eval_shape`/`jax.jit`. The base weights stay
  `nnx.Param`s (or `QuantizedWeight`s): train with `trainable=nnx.LoRAParam`. A reward
  model's `score` projection is never adapted (it is not a target name).
  """
  if has_lora(model):
    raise ConfigError("the model already has LoRA adapters: merge them first (merge_lora)")
  if "lm_head" in cfg.target_modules and model.config.tie_embeddings:
    raise ConfigError("LoraConfig.target_modules names lm_head, but this model ties it to the "
                      "token embedding (tie_embeddings=True): an adapted head would no longer "
                      "be the embedding. Leave lm_head out of target_modules")
  if "lm_head" in cfg.target_modules and model.config.head != "lm":
    # Refused rather than skipped: a config asking for it was written for a language model.
    raise ConfigError(f"LoraConfig.target_modules names lm_head, but this model has head "
                      f"{model.config.head!r} (a reward model): it has no lm_head, and its "
                      "score projection never gets an adapter. Leave lm_head out of "
                      "target_modules")
  mlp_targets = [t for t in cfg.target_modules if t in weights.MLP]
  if model.config.n_experts and mlp_targets:
    raise ConfigError(f"LoraConfig.target_modules names {mlp_targets}, but this model's MLPs "
                      f"are mixtures of {model.config.n_experts} experts, whose stacked expert "
                      "weights take no adapters: target the attention projections (q_proj, "
                      "k_proj, v_proj, o_proj) and/or lm_head")
  key = jax.random.key(cfg.seed)
  dtype = jnp.dtype(model.config.param_dtype)
  for i, (owner, attr, _) in enumerate(
      weights.projection_weights(model, cfg.target_modules)):
    layout = weights.LAYOUTS[attr]
    shape = _base_shape(owner, attr)
    setattr(owner, attr + "_lora",
            LoraAdapter(shape[:layout.n_in], shape[layout.n_in:], layout.in_axes,
                        layout.out_axes, cfg, jax.random.fold_in(key, i), dtype))
  return model


def has_lora(model_or_state: Any) -> bool:
  """Whether a model (or its state) holds any LoRA adapter."""
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return bool(jax.tree.leaves(state.filter(nnx.LoRAParam)))


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Makes `model` a plain float model computing what it computed, in place; returns it.

  Each adapter folds into its weight (`W + s A B`) and is removed; every quantized weight (a
  QLoRA base, adapted or not) is dequantized: float weights that `transformers` can load and
  any stage can start from.
  """
  from llmjax.model.quant import QuantizedWeight
  for owner, attr, _ in list(weights.projection_weights(model, TARGET_MODULES)):
    var = getattr(owner, attr, None)  # None: a head tied to the embedding
    if var is None:
      continue
    if isinstance(var, QuantizedWeight):
      layout = weights.LAYOUTS[attr]
      var = nnx.Param(var.get_value().dequantize(jnp.dtype(model.config.param_dtype)),
                      logical_axes=layout.in_axes + layout.out_axes)
      setattr(owner, attr, var)
    adapter = getattr(owner, attr + "_lora", None)
    if adapter is not None:
      delta = jnp.tensordot(adapter.a[...].astype(jnp.float32),
                            adapter.b[...].astype(jnp.float32), axes=1) * adapter.scale
      base = var[...]
      var.set_value((base.astype(jnp.float32) + delta).astype(base.dtype))
      delattr(owner, attr + "_lora")
  return model


class WithoutAdapters:
  """A LoRA model seen with its adapters off: the reference model of a LoRA run.

  It shares the model's base weights (no second copy in memory); its outputs carry no
  gradient, and an MoE model's routing in it adds no router loss.
  """

  def __init__(self, model: nnx.Module):
    self._model = model
    self.config = model.config

  def _off(self, method, *args, **kwargs):
    with adapters_disabled(), router_losses.not_recorded():
      return jax.tree.map(jax.lax.stop_gradient, method(*args, **kwargs))

  def __call__(self, *args, **kwargs):
    return self._off(self._model, *args, **kwargs)

  def hidden_states(self, *args, **kwargs):
    return self._off(self._model.hidden_states, *args, **kwargs)

  def logits(self, hidden: jax.Array) -> jax.Array:
    return self._off(self._model.logits, hidden)

  def scores(self, hidden: jax.Array) -> jax.Array:
    return self._off(self._model.scores, hidden)


def adapter_bytes(state: nnx.State) -> int:
  """Bytes of the LoRA adapters in `state`."""
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(state.filter(nnx.LoRAParam)))

