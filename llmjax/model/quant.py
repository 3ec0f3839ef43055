"""Weight-only quantization of a trained model: per-channel int8, group-wise int4 and NF4.

Only the projection weights are quantized (q/k/v/o, gate/up/down and, optionally, lm_head);
embeddings, norms and biases stay in float, where they are a small share of the bytes and
a large share of the error.

A quantized model is the same `Transformer` with each quantized `nnx.Param` replaced by a
`QuantizedWeight` variable holding a `QuantizedTensor` pytree (the packed codes and scales
of the 2-D `[d_in, d_out]` view of the weight). `project()` dispatches on that type, so
int4/NF4 weights run through the Pallas `int4_matmul` and int8 weights through an XLA dot
on the widened codes. `QuantizedWeight` is not an `nnx.Param`, so optimizers and filters
over `nnx.Param` (LoRA on a frozen quantized base) leave it alone. The state is an ordinary
pytree of arrays: it jits, and saves and restores through Orbax like float parameters.
"""

from __future__ import annotations

import dataclasses
import functools

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from llmjax.errors import ConfigError
from llmjax.kernels import Int4Weight, dequantize_int4, int4_matmul, quantize_int4
from llmjax.model import weights
from llmjax.model.matmul import CHECKPOINT_NAME

SCHEMES = ("int4", "nf4", "int8")
KERNELS = ("pallas", "reference")
GROUP_SIZES = (32, 64, 128)  # what the int4 kernel tiles

@gin.configurable
@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How to quantize a model's weights, and which kernel runs the int4 matmuls.

  Attributes:
    scheme: 'int4' (symmetric absmax per group), 'nf4' (QLoRA NormalFloat4 per group) or
      'int8' (symmetric absmax per output channel; `group_size` is ignored).
    group_size: rows of d_in sharing one scale for int4/NF4: 32, 64 or 128.
    kernel: 'pallas' (the fused dequantize-matmul kernel; interpret mode on CPU) or
      'reference' (dequantize, then an XLA einsum). int8 always uses an XLA dot.
    quantize_lm_head: also quantize the untied output projection. It is dequantized on
      read (stored small, computed in float), as its matmul lives outside `project()`.
  """
  scheme: str = "int4"
  group_size: int = 64
  kernel: str = "pallas"
  quantize_lm_head: bool = False

  def __post_init__(self):
    if self.scheme not in SCHEMES:
      raise ConfigError(f"QuantConfig.scheme must be one of {SCHEMES}, got {self.scheme!r}")
    if self.group_size not in GROUP_SIZES:
      raise ConfigError(f"QuantConfig.group_size must be one of {GROUP_SIZES}, got "
                        f"{self.group_size}")
    if self.kernel not in KERNELS:
      raise ConfigError(f"QuantConfig.kernel must be one of {KERNELS}, got {self.kernel!r}")


@functools.partial(jax.tree_util.register_dataclass, data_fields=["codes", "scales"],
                   meta_fields=["shape"])
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """A `[d_in, d_out]` weight as int8 codes with one float32 scale per output column.

  Attributes:
    codes: int8 `[d_in, d_out]` in -127..127 (symmetric: -128 is never used).
    scales: float32 `[d_out]`, absmax of the column / 127.
    shape: the logical `(d_in, d_out)`.
  """
  codes: jax.Array
  scales: jax.Array
  shape: tuple[int, int]


@jax.jit
def quantize_int8(w: jax.Array) -> Int8Weight:
  """Per-output-channel absmax int8 of `w [d_in, d_out]`; |w - dequant| <= scale/2."""
  w = w.astype(jnp.float32)
  scales = jnp.max(jnp.abs(w), axis=0) / 127.0
  inv = jnp.where(scales > 0, 1.0 / jnp.where(scales > 0, scales, 1.0), 0.0)
  codes = jnp.clip(jnp.round(w * inv), -127, 127).astype(jnp.int8)
  return Int8Weight(codes, scales, tuple(w.shape))


def dequantize_int8(q: Int8Weight, dtype=jnp.float32) -> jax.Array:
  """Int8Weight -> `[d_in, d_out]` in `dtype` (computed in float32)."""
  return (q.codes.astype(jnp.float32) * q.scales).astype(dtype)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"],
                   meta_fields=["shape", "n_in", "kernel"])
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
  """A quantized weight of any rank, stored as its 2-D `[d_in, d_out]` view.

  Attributes:
    weight: `Int4Weight` (int4/NF4) or `Int8Weight` of the 2-D view.
    shape: the original weight's shape, e.g. `(d_model, n_heads, head_dim)`.
    n_in: how many leading axes of `shape` form d_in (the contracted axes).
    kernel: 'pallas' or 'reference', for int4/NF4 matmuls.
  """
  weight: Int4Weight | Int8Weight
  shape: tuple[int, ...]
  n_in: int
  kernel: str

  @property
  def scheme(self) -> str:
    return "int8" if isinstance(self.weight, Int8Weight) else self.weight.scheme

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    """The float weight in its original shape."""
    if isinstance(self.weight, Int8Weight):
      w = dequantize_int8(self.weight, dtype)
    else:
      w = dequantize_int4(self.weight, dtype)
    return w.reshape(self.shape)


class QuantizedWeight(nnx.Variable):
  """Holds a `QuantizedTensor`; `[...]` returns it (or, for lm_head, its float weight).

  `dequantize_on_read=True` (metadata) serves a weight whose matmul is not routed through
  `project()` and so cannot take a `QuantizedTensor`.
  """

  def __getitem__(self, key):
    if key is not Ellipsis:
      raise TypeError(f"a quantized weight can only be read whole (w[...]), not w[{key!r}]")
    value = self.get_value()
    if self.get_metadata().get("dequantize_on_read", False):
      return value.dequantize(jnp.dtype(self.get_metadata()["dtype"]))
    return value


def quantize_tensor(w: jax.Array, n_in: int, cfg: QuantConfig, name: str = "weight"
                    ) -> QuantizedTensor:
  """Quantizes `w` (any rank; the first `n_in` axes are d_in) as `cfg` says."""
  shape = tuple(w.shape)
  d_in = int(np.prod(shape[:n_in]))
  w2 = w.reshape(d_in, -1)
  if cfg.scheme == "int8":
    q = quantize_int8(w2)
  else:
    if d_in % cfg.group_size:
      raise ConfigError(
          f"{name} has d_in={d_in}, not divisible by QuantConfig.group_size="
          f"{cfg.group_size}: choose a group size in {GROUP_SIZES} that divides it")
    q = quantize_int4(w2, group_size=cfg.group_size, scheme=cfg.scheme)
  return QuantizedTensor(q, shape, n_in, cfg.kernel)


def quantized_project(x: jax.Array, w: QuantizedTensor, spec: str, dtype) -> jax.Array:
  """`einsum(spec, x, dequant(w))` as one 2-D matmul `[..., d_in] @ [d_in, d_out]`.

  The spec must contract the trailing axes of x with the leading `w.n_in` axes of the
  weight, and keep x's other axes followed by the weight's rest -- true of every projection
  in the model (e.g. "bsd,dnh->bsnh", "bsnh,nhd->bsd").
  """
  ins, out = spec.replace(" ", "").split("->")
  xs, ws = ins.split(",")
  w_in, w_out = ws[:w.n_in], ws[w.n_in:]
  lead = xs[:len(xs) - w.n_in]
  if not xs.endswith(w_in) or out != lead + w_out:
    raise ValueError(f"einsum spec {spec!r} is not a [..., d_in] @ [d_in, d_out] matmul "
                     f"for a quantized weight with {w.n_in} input axes")
  lead_shape = x.shape[:len(lead)]
  x2 = x.reshape(*lead_shape, -1).astype(dtype)
  q = w.weight
  if isinstance(q, Int8Weight):
    # Codes widen exactly to bf16/f32; the per-column scale commutes with the dot, so it is
    # applied to the [.., d_out] output instead of the [d_in, d_out] weight.
    y = jnp.einsum("...k,kn->...n", x2, q.codes.astype(dtype)) * q.scales.astype(dtype)
  else:
    # Named so that the 'dots' remat policies keep it (a pallas_call is not a dot to them).
    y = checkpoint_name(int4_matmul(x2, q, impl=w.kernel), CHECKPOINT_NAME)
  return y.reshape(*lead_shape, *w.shape[w.n_in:])


def _quantizable(model: nnx.Module, cfg: QuantConfig):
  """(owner module, attribute, dotted name) of each weight `cfg` quantizes."""
  names = weights.ATTENTION + weights.MLP
  if cfg.quantize_lm_head and model.config.head == "lm" and not model.config.tie_embeddings:
    names += ("lm_head",)
  return weights.projection_weights(model, names)


def quantize_model(model: nnx.Module, cfg: QuantConfig) -> nnx.Module:
  """Replaces `model`'s projection weights with `QuantizedWeight`s, in place; returns it.

  Works on a concrete model and under `nnx.eval_shape` (to build the abstract state a
  quantized checkpoint restores into). A mixture of experts is refused: its expert weights,
  most of its parameters, have no quantized path.
  """
  if model.config.n_experts:
    raise ConfigError(f"quantizing a mixture-of-experts model (n_experts="
                      f"{model.config.n_experts}) is not supported: its stacked expert "
                      "weights have no quantized matmul. Keep it in float (bfloat16 "
                      "parameters halve it), and use LoRA without quantize_base")
  for owner, attr, name in _quantizable(model, cfg):
    param = getattr(owner, attr)
    if isinstance(param, QuantizedWeight):
      raise ConfigError(f"{name} is already quantized ({param.get_value().scheme}): "
                        "quantize the float checkpoint instead")
    w = param[...]
    layout = weights.LAYOUTS[attr]
    # The 2-D view's axes: its rows are the first input axis' blocks, its columns the first
    # output axis' (heads stay whole when the flattened columns are split evenly).
    meta = {"scheme": cfg.scheme, "logical_axes": (layout.in_axes[0], layout.out_axes[0])}
    if attr == "lm_head":
      meta.update(dequantize_on_read=True, dtype=str(w.dtype))
    setattr(owner, attr, QuantizedWeight(quantize_tensor(w, layout.n_in, cfg, name), **meta))
  return model


def weight_bytes(state: nnx.State) -> dict[str, int]:
  """Bytes of the state: `total`, `quantized` (QuantizedWeights) and `float` (the rest);
  `quantized_params`: how many weights the QuantizedWeights stand for."""
  out = {"total": 0, "quantized": 0, "float": 0, "quantized_params": 0}
  for var in jax.tree.leaves(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
    value = var.get_value()
    n = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
            for a in jax.tree.leaves(value))
    if isinstance(var, QuantizedWeight):
      out["quantized"] += n
      out["quantized_params"] += int(np.prod(value.shape))
    else:
      out["float"] += n
    out["total"] += n
  return out
