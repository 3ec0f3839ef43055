"""Weight-only int4 / NF4 quantization and a dequantize-in-kernel matmul.

Packed layout (`pack_int4`): within each group of `group_size` rows along
d_in, byte row j of the group holds row j in its low nibble and row
j + group_size/2 in its high nibble. Pairing the two halves of a group
(rather than adjacent rows) means unpacking never interleaves rows: the
kernel runs two dots of depth group_size/2 -- x's first half-group columns
against the low nibbles, the second half against the high nibbles -- with
no in-kernel reshape/concatenate, which Triton and Mosaic handle poorly.
Both halves share the group's scale, applied to the weights before the dot.

Schemes: "int4" is symmetric absmax (scale = absmax/7, codes q+8 in 0..15);
"nf4" is QLoRA's NormalFloat4 (16 fixed code points in [-1, 1], scale =
absmax). In-kernel decoding of NF4 is a 4-level select tree on the code's
bits: gathers from a table do not lower portably.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from llmjax.kernels import _tiling
from llmjax.kernels._tiling import dot, pad_axis, round_up

_F32 = jnp.float32

# QLoRA NormalFloat4 code points (Dettmers et al., 2023), ascending.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)

_GROUP_SIZES = (32, 64, 128)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["packed", "scales"],
                   meta_fields=["scheme", "group_size", "shape"])
@dataclasses.dataclass(frozen=True)
class Int4Weight:
  """A frozen `[d_in, d_out]` weight stored as 4-bit codes.

  Attributes:
    packed: uint8 `[d_in // 2, d_out]`, two codes per byte (see module doc).
    scales: `[d_in // group_size, d_out]` fp32 or bf16, one per group/column.
    scheme: "int4" or "nf4".
    group_size: rows of d_in sharing a scale.
    shape: the logical `(d_in, d_out)`.
  """
  packed: jax.Array
  scales: jax.Array
  scheme: str
  group_size: int
  shape: tuple[int, int]


def pack_int4(codes: jax.Array, group_size: int) -> jax.Array:
  """uint8 codes `[d_in, d_out]` in 0..15 -> packed uint8 `[d_in//2, d_out]`."""
  d_in, d_out = codes.shape
  h = group_size // 2
  c = codes.astype(jnp.uint8).reshape(d_in // group_size, 2, h, d_out)
  return (c[:, 0] | (c[:, 1] << 4)).reshape(d_in // 2, d_out)


def unpack_int4(packed: jax.Array, group_size: int) -> jax.Array:
  """Inverse of `pack_int4`: uint8 `[d_in//2, d_out]` -> codes `[d_in, d_out]`."""
  half_rows, d_out = packed.shape
  h = group_size // 2
  p = packed.reshape(half_rows // h, 1, h, d_out)
  c = jnp.concatenate([p & 0xF, p >> 4], axis=1)
  return c.reshape(half_rows * 2, d_out)


def _decode(codes: jax.Array, scheme: str) -> jax.Array:
  """int codes in 0..15 -> unscaled fp32 values; kernel- and jnp-safe."""
  if scheme == "int4":
    return (codes - 8).astype(_F32)
  bits = [(codes >> i) & 1 for i in range(4)]
  vals = [float(v) for v in NF4_CODE]
  # Level i picks between neighbours that differ in bit i.
  for bit in bits:
    vals = [jnp.where(bit == 1, hi, lo) for lo, hi in zip(vals[0::2],
                                                            vals[1::2])]
  return jnp.asarray(vals[0], _F32)


def _check_group(d_in: int, group_size: int) -> None:
  if group_size not in _GROUP_SIZES:
    raise ValueError(f"group_size must be one of {_GROUP_SIZES}, "
                     f"got {group_size}")
  if d_in % group_size:
    raise ValueError(f"d_in={d_in} must be divisible by group_size="
                     f"{group_size}")


@functools.partial(jax.jit, static_argnames=("group_size", "scheme",
                                             "scale_dtype"))
def quantize_int4(w: jax.Array, group_size: int = 64,
                  scheme: Literal["int4", "nf4"] = "int4",
                  scale_dtype=jnp.float32) -> Int4Weight:
  """Groupwise absmax quantization of `w` `[d_in, d_out]` to 4-bit codes.

  Error bounds per element (relative to the stored scale s): int4 rounds to
  the nearest multiple of s = absmax/7, so |err| <= s/2; NF4 rounds w/absmax
  to the nearest code point, so |err| <= absmax * (largest gap)/2.
  """
  if scheme not in ("int4", "nf4"):
    raise ValueError(f"scheme must be 'int4' or 'nf4', got {scheme!r}")
  if w.ndim != 2:
    raise ValueError(f"w must be [d_in, d_out], got {w.shape}")
  d_in, d_out = w.shape
  _check_group(d_in, group_size)
  wg = w.astype(_F32).reshape(d_in // group_size, group_size, d_out)
  absmax = jnp.max(jnp.abs(wg), axis=1)
  scale = (absmax / 7.0 if scheme == "int4" else absmax).astype(scale_dtype)
  # Quantize against the *stored* (possibly bf16-rounded) scale so the
  # error bound holds for what dequantize actually reads back.
  s = scale.astype(_F32)[:, None, :]
  inv = jnp.where(s > 0, 1.0 / jnp.where(s > 0, s, 1.0), 0.0)
  if scheme == "int4":
    codes = jnp.clip(jnp.round(wg * inv), -8, 7) + 8
  else:
    codes = jnp.argmin(jnp.abs((wg * inv)[..., None] - NF4_CODE), axis=-1)
  codes = codes.astype(jnp.uint8).reshape(d_in, d_out)
  return Int4Weight(pack_int4(codes, group_size), scale, scheme, group_size,
                    (d_in, d_out))


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize_int4(q: Int4Weight, dtype=jnp.float32) -> jax.Array:
  """Int4Weight -> `[d_in, d_out]` in `dtype` (computed in fp32)."""
  d_in, d_out = q.shape
  codes = unpack_int4(q.packed, q.group_size).astype(jnp.int32)
  vals = _decode(codes, q.scheme).reshape(-1, q.group_size, d_out)
  w = vals * q.scales.astype(_F32)[:, None, :]
  return w.reshape(d_in, d_out).astype(dtype)


def int4_matmul_reference(x: jax.Array, q: Int4Weight) -> jax.Array:
  """`x [..., d_in] @ dequant(q)` -> `[..., d_out]` in x.dtype, fp32 acc.

  The weights are rounded to x.dtype before the dot, like the kernel.
  """
  w = dequantize_int4(q).astype(x.dtype)
  return jnp.einsum("...k,kn->...n", x, w, precision=lax.Precision.HIGHEST,
                    preferred_element_type=_F32).astype(x.dtype)


def _dequant_halves(p_ref, s_ref, rows, cols, srow, scheme, cdt):
  """Loads one group's bytes and returns its (low, high) half weights.

  `rows`/`cols` select a `[gs/2, tn]` byte tile and `srow` its `[1, tn]`
  scale row; both outputs are `[gs/2, tn]` in `cdt`, already scaled.
  """
  # Widen before bit ops: uint8 vector ops are patchy on TPU and Triton
  # dots/shift semantics assume signed ints.
  byte = p_ref[rows, cols].astype(jnp.int32)
  s = s_ref[srow, cols].astype(_F32)  # [1, tn]
  lo = (_decode(byte & 0xF, scheme) * s).astype(cdt)
  hi = (_decode(byte >> 4, scheme) * s).astype(cdt)
  return lo, hi


def _fwd_kernel(x_ref, p_ref, s_ref, o_ref, *, gs: int, gpb: int,
                n_steps: int, scheme: str):
  """o `[tm, tn]` = x `[tm, K]` @ dequant(p `[K/2, tn]`, s `[K/gs, tn]`).

  Each fori_loop step covers `gpb` groups (gpb * gs rows of K), unrolled so
  the compiler sees several independent dots per step.
  """
  h = gs // 2
  cdt = x_ref.dtype
  full = slice(None)

  def body(step, acc):
    for gi in range(gpb):
      g = step * gpb + gi
      lo, hi = _dequant_halves(p_ref, s_ref, pl.ds(g * h, h), full,
                               pl.ds(g, 1), scheme, cdt)
      acc = acc + dot(x_ref[:, pl.ds(g * gs, h)], lo)
      acc = acc + dot(x_ref[:, pl.ds(g * gs + h, h)], hi)
    return acc

  acc = lax.fori_loop(0, n_steps, body, jnp.zeros(o_ref.shape, _F32))
  o_ref[...] = acc.astype(o_ref.dtype)


def _bwd_kernel(dy_ref, p_ref, s_ref, o_ref, *, gs: int, tn: int,
                n_steps: int, scheme: str):
  """dx `[tm, G*gs]` = dy `[tm, N]` @ dequant(p `[G*gs/2, N]`)^T.

  The output tile covers G whole groups; each group's two halves land in
  adjacent column ranges, so the stores are static slices.
  """
  h = gs // 2
  n_groups = s_ref.shape[0]
  tm = o_ref.shape[0]
  cdt = dy_ref.dtype

  def body(step, accs):
    n0 = pl.multiple_of(step * tn, tn)
    cols = pl.ds(n0, tn)
    dyk = dy_ref[:, cols]
    out = []
    for gi in range(n_groups):
      lo, hi = _dequant_halves(p_ref, s_ref, slice(gi * h, gi * h + h), cols,
                               slice(gi, gi + 1), scheme, cdt)
      out.append(accs[2 * gi] + dot(dyk, lo, trans_b=True))
      out.append(accs[2 * gi + 1] + dot(dyk, hi, trans_b=True))
    return tuple(out)

  init = tuple(jnp.zeros((tm, h), _F32) for _ in range(2 * n_groups))
  accs = lax.fori_loop(0, n_steps, body, init)
  for i, acc in enumerate(accs):
    o_ref[:, i * h:(i + 1) * h] = acc.astype(o_ref.dtype)


def _groups_per_block(n_groups: int, gs: int, tk: int) -> int:
  """Largest power of two <= tk/gs that divides n_groups (no K padding)."""
  g = max(1, tk // gs)
  g = 1 << (g.bit_length() - 1)
  while n_groups % g:
    g //= 2
  return g


@dataclasses.dataclass(frozen=True)
class _Cfg:
  tm: int
  tn: int
  tk: int
  scheme: str
  group_size: int
  interpret: bool


def _fwd_call(x, packed, scales, cfg: _Cfg):
  mp, k = x.shape
  np_ = packed.shape[1]
  gs = cfg.group_size
  gpb = _groups_per_block(k // gs, gs, cfg.tk)
  kernel = functools.partial(_fwd_kernel, gs=gs, gpb=gpb,
                             n_steps=k // (gs * gpb), scheme=cfg.scheme)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
      grid=(mp // cfg.tm, np_ // cfg.tn),
      in_specs=[pl.BlockSpec((cfg.tm, k), lambda i, j: (i, 0)),
                pl.BlockSpec((k // 2, cfg.tn), lambda i, j: (0, j)),
                pl.BlockSpec((k // gs, cfg.tn), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((cfg.tm, cfg.tn), lambda i, j: (i, j)),
      interpret=cfg.interpret,
      compiler_params=_tiling.compiler_params(cfg.interpret,
                                              ("parallel", "parallel")),
      name=f"{cfg.scheme}_matmul",
  )(x, packed, scales)


def _bwd_call(dy, packed, scales, cfg: _Cfg):
  mp, np_ = dy.shape
  k = packed.shape[0] * 2
  gs = cfg.group_size
  g = _groups_per_block(k // gs, gs, cfg.tk)
  # TPU caveat (unverified): the scales block is `[g, N]`, and Mosaic wants
  # g % 8 == 0 or g == K/gs; full-N blocks also cost VMEM ~ (tm*2 +
  # g*gs/2) * N bytes, double buffered. GPU (Triton) has neither limit.
  kernel = functools.partial(_bwd_kernel, gs=gs, tn=cfg.tn,
                             n_steps=np_ // cfg.tn, scheme=cfg.scheme)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((mp, k), dy.dtype),
      grid=(mp // cfg.tm, k // (g * gs)),
      in_specs=[pl.BlockSpec((cfg.tm, np_), lambda i, j: (i, 0)),
                pl.BlockSpec((g * gs // 2, np_), lambda i, j: (j, 0)),
                pl.BlockSpec((g, np_), lambda i, j: (j, 0))],
      out_specs=pl.BlockSpec((cfg.tm, g * gs), lambda i, j: (i, j)),
      interpret=cfg.interpret,
      compiler_params=_tiling.compiler_params(cfg.interpret,
                                              ("parallel", "parallel")),
      name=f"{cfg.scheme}_matmul_dx",
  )(dy, packed, scales)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int4_aligned(x, packed, scales, cfg: _Cfg):
  return _fwd_call(x, packed, scales, cfg)


def _int4_aligned_fwd(x, packed, scales, cfg):
  return _fwd_call(x, packed, scales, cfg), (packed, scales)


def _int4_aligned_bwd(cfg, res, dy):
  packed, scales = res
  # The quantized weight is frozen: no cotangent for codes or scales.
  return (_bwd_call(dy, packed, scales, cfg),
          np.zeros(packed.shape, jax.dtypes.float0), jnp.zeros_like(scales))


_int4_aligned.defvjp(_int4_aligned_fwd, _int4_aligned_bwd)


def int4_matmul(x: jax.Array, q: Int4Weight, *,
                impl: Literal["pallas", "reference"] = "pallas",
                block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None,
                interpret: bool | None = None) -> jax.Array:
  """`x [..., d_in] @ dequant(q) -> [..., d_out]` in x.dtype.

  Args:
    x: activations, fp32 or bf16; leading dims flatten to M (1 for decode).
    q: `Int4Weight` for a `[d_in, d_out]` weight (frozen: only x gets a
      gradient, dx = dy @ dequant(q)^T, also through a Pallas kernel).
    impl: "pallas" or "reference" (dequantize then jnp einsum).
    block_m, block_n, block_k: tile overrides; block_k is rounded to whole
      groups that divide d_in (weights are never padded along d_in).
    interpret: Pallas interpret mode; None = interpret iff backend is CPU.
  """
  d_in, d_out = q.shape
  if x.shape[-1] != d_in:
    raise ValueError(f"x last dim {x.shape[-1]} != weight d_in {d_in}")
  _check_group(d_in, q.group_size)
  if impl == "reference":
    return int4_matmul_reference(x, q)
  if impl != "pallas":
    raise ValueError(f"impl must be 'pallas' or 'reference', got {impl!r}")

  lead = x.shape[:-1]
  x2 = x.reshape(-1, d_in)
  m = x2.shape[0]
  d = _tiling.default_block_sizes(jax.default_backend(), m, d_out, d_in)
  tm, tn = block_m or d.tm, block_n or d.tn
  tk = max(block_k or d.tk, q.group_size)
  mp, np_ = round_up(m, tm), round_up(d_out, tn)
  # Zero bytes with zero scales dequantize to exactly 0 in both schemes.
  packed = pad_axis(q.packed, 1, np_)
  scales = pad_axis(q.scales, 1, np_)
  cfg = _Cfg(tm, tn, tk, q.scheme, q.group_size,
             _tiling.resolve_interpret(interpret))
  y = _int4_aligned(pad_axis(x2, 0, mp), packed, scales, cfg)
  return y[:m, :d_out].reshape(*lead, d_out)
