"""Fused LoRA matmul: `y = x @ W + scale * (x @ A) @ B` in one Pallas pass.

The low-rank path shares the x tiles the base matmul already loads: while a
program walks K for its `[tm, tn]` output tile it also accumulates the
`[tm, r]` partial `x @ A`, and adds `scale * (xA) @ B_tile` once at the end.
Unfused, LoRA reads x twice and writes/reads the `[M, r]` intermediate
through HBM in a separate launch. The price is that `xA` is recomputed for
every N tile: r / tn extra MACs relative to the base matmul (e.g. 16/128).

W is frozen: the custom VJP returns a zero cotangent for it (never used by
an optimizer, so XLA drops it under jit) and computes only dx, dA and dB.

Portability: the K loop lives inside the kernel body (`lax.fori_loop` over
`pl.ds` slices of full-K refs) rather than on a grid axis with a scratch
accumulator, because Triton grids are fully parallel and `scratch_shapes`
are TPU-only; see `_tiling.py` for the per-backend block-size rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from llmjax.kernels import _tiling
from llmjax.kernels._tiling import BlockSizes, dot, pad_axis, round_up

_F32 = jnp.float32


def lora_matmul_reference(x: jax.Array, w: jax.Array, a: jax.Array,
                          b: jax.Array, scale: float) -> jax.Array:
  """Pure-jnp LoRA matmul with the same precision policy as the kernel.

  Args:
    x: `[..., d_in]` activations.
    w: `[d_in, d_out]` base weight.
    a: `[d_in, r]` LoRA down projection.
    b: `[r, d_out]` LoRA up projection.
    scale: LoRA scale (alpha / r).

  Returns:
    `[..., d_out]` in x.dtype; both paths accumulate in fp32 and the low-rank
    product `(xA) @ B` is done in fp32.
  """
  hp = lax.Precision.HIGHEST
  base = jnp.einsum("...k,kn->...n", x, w.astype(x.dtype), precision=hp,
                    preferred_element_type=_F32)
  xa = jnp.einsum("...k,kr->...r", x, a.astype(x.dtype), precision=hp,
                  preferred_element_type=_F32)
  low = jnp.einsum("...r,rn->...n", xa, b.astype(_F32), precision=hp)
  return (base + scale * low).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class _Cfg:
  """Static kernel configuration (hashable, so it can be a nondiff arg)."""
  blocks: BlockSizes
  interpret: bool


def _fused_kernel(x_ref, w_ref, a_ref, b_ref, y_ref, xa_ref, *, scale: float,
                  tk: int, n_k: int, transposed: bool):
  """One `[tm, tn]` output tile; loops over K inside the body.

  Non-transposed refs: x `[tm, K]`, w `[K, tn]`, a `[K, r]`, b `[r, tn]`.
  Transposed (used for dx = dy W^T + s (dy B^T) A^T, with the operands
  passed as W, B, A in their stored layouts): w `[tn, K]`, a `[r, K]`,
  b `[tn, r]`. Contracting the stored layouts in-kernel avoids
  materializing W^T in HBM on every backward step.
  Outputs: y `[tm, tn]`, xa `[tm, r]` fp32 (the unscaled low-rank partial,
  kept as a residual for the weight gradients).
  """
  tm = x_ref.shape[0]
  tn = y_ref.shape[1]
  r = xa_ref.shape[1]
  cdt = x_ref.dtype

  def body(kk, carry):
    acc, xa = carry
    k0 = pl.multiple_of(kk * tk, tk)
    xk = x_ref[:, pl.ds(k0, tk)]
    if transposed:
      wk = w_ref[:, pl.ds(k0, tk)].astype(cdt)
      ak = a_ref[:, pl.ds(k0, tk)].astype(cdt)
    else:
      wk = w_ref[pl.ds(k0, tk), :].astype(cdt)
      ak = a_ref[pl.ds(k0, tk), :].astype(cdt)
    acc = acc + dot(xk, wk, trans_b=transposed)
    xa = xa + dot(xk, ak, trans_b=transposed)
    return acc, xa

  init = (jnp.zeros((tm, tn), _F32), jnp.zeros((tm, r), _F32))
  acc, xa = lax.fori_loop(0, n_k, body, init)
  # fp32 for the rank-r product: it is tiny and keeps the adapter's
  # contribution from being rounded to bf16 before the add.
  bt = b_ref[...].astype(_F32)
  y_ref[...] = (acc + scale * dot(xa, bt, trans_b=transposed)).astype(
      y_ref.dtype)

  # Every N tile computes the same xA; only the first stores it so no two
  # programs race on the block (Triton runs the grid in parallel).
  @pl.when(pl.program_id(1) == 0)
  def _():
    xa_ref[...] = xa


def _fused_call(x, w, a, b, scale: float, cfg: _Cfg, transposed: bool):
  """x `[Mp, Kp]` (tile-aligned) -> (y `[Mp, Np]` x.dtype, xa `[Mp, r]` f32).

  `cfg.blocks` holds (tm, tn, tk) for this call's own M/N/K.
  """
  mp, kp = x.shape
  np_ = w.shape[0] if transposed else w.shape[1]
  r = a.shape[0] if transposed else a.shape[1]
  tm, tn, tk = cfg.blocks.tm, cfg.blocks.tn, cfg.blocks.tk
  if transposed:
    w_spec = pl.BlockSpec((tn, kp), lambda i, j: (j, 0))
    a_spec = pl.BlockSpec((r, kp), lambda i, j: (0, 0))
    b_spec = pl.BlockSpec((tn, r), lambda i, j: (j, 0))
  else:
    w_spec = pl.BlockSpec((kp, tn), lambda i, j: (0, j))
    a_spec = pl.BlockSpec((kp, r), lambda i, j: (0, 0))
    b_spec = pl.BlockSpec((r, tn), lambda i, j: (0, j))
  kernel = functools.partial(_fused_kernel, scale=scale, tk=tk,
                             n_k=kp // tk, transposed=transposed)
  return pl.pallas_call(
      kernel,
      out_shape=(jax.ShapeDtypeStruct((mp, np_), x.dtype),
                 jax.ShapeDtypeStruct((mp, r), _F32)),
      grid=(mp // tm, np_ // tn),
      in_specs=[pl.BlockSpec((tm, kp), lambda i, j: (i, 0)), w_spec, a_spec,
                b_spec],
      out_specs=(pl.BlockSpec((tm, tn), lambda i, j: (i, j)),
                 pl.BlockSpec((tm, r), lambda i, j: (i, 0))),
      interpret=cfg.interpret,
      # N must run in order per M tile on TPU: only j == 0 stores xa.
      compiler_params=_tiling.compiler_params(cfg.interpret,
                                              ("parallel", "arbitrary")),
      name="lora_matmul_t" if transposed else "lora_matmul",
  )(x, w, a, b)


def _tn_kernel(l_ref, r_ref, o_ref, *, scale: float, tm: int, n_m: int):
  """o `[tp, tq]` = scale * l `[M, tp]`^T @ r `[M, tq]`, looping over M.

  Both operands are upcast to fp32: these are the rank-r weight gradients,
  cheap (M * r * max(K, N) MACs) and worth keeping exact.
  """
  def body(mm, acc):
    m0 = pl.multiple_of(mm * tm, tm)
    lk = l_ref[pl.ds(m0, tm), :].astype(_F32)
    rk = r_ref[pl.ds(m0, tm), :].astype(_F32)
    return acc + dot(lk, rk, trans_a=True)

  acc = lax.fori_loop(0, n_m, body, jnp.zeros(o_ref.shape, _F32))
  o_ref[...] = (scale * acc).astype(o_ref.dtype)


def _tn_call(lhs, rhs, scale: float, *, tp: int, tq: int, tm: int,
             out_dtype, interpret: bool):
  """scale * lhs `[Mp, P]`^T @ rhs `[Mp, Q]` -> `[P, Q]`; tp | P, tq | Q."""
  mp, p = lhs.shape
  q = rhs.shape[1]
  kernel = functools.partial(_tn_kernel, scale=scale, tm=tm, n_m=mp // tm)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((p, q), out_dtype),
      grid=(p // tp, q // tq),
      in_specs=[pl.BlockSpec((mp, tp), lambda i, j: (0, i)),
                pl.BlockSpec((mp, tq), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((tp, tq), lambda i, j: (i, j)),
      interpret=interpret,
      compiler_params=_tiling.compiler_params(interpret,
                                              ("parallel", "parallel")),
      name="lora_weight_grad",
  )(lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _lora_aligned(x, w, a, b, scale: float, cfg: _Cfg):
  """Tile-aligned fused LoRA: x `[Mp, Kp]` -> `[Mp, Np]`."""
  return _fused_call(x, w, a, b, scale, cfg, transposed=False)[0]


def _lora_aligned_fwd(x, w, a, b, scale, cfg):
  y, xa = _fused_call(x, w, a, b, scale, cfg, transposed=False)
  return y, (x, w, a, b, xa)


def _lora_aligned_bwd(scale, cfg, res, dy):
  x, w, a, b, xa = res
  tm, tn, tk = cfg.blocks.tm, cfg.blocks.tn, cfg.blocks.tk
  # dx has the forward's shape with N and K swapped, so the tiles swap too.
  dx_cfg = dataclasses.replace(cfg, blocks=BlockSizes(tm, tk, tn))
  dx, dyb = _fused_call(dy, w, b, a, scale, dx_cfg, transposed=True)
  r = a.shape[1]
  # dA = s x^T (dy B^T): tiles over K, full (small) rank.
  da = _tn_call(x, dyb, scale, tp=tk, tq=r, tm=tm, out_dtype=a.dtype,
                interpret=cfg.interpret)
  # dB = s (xA)^T dy: full rank, tiles over N.
  db = _tn_call(xa, dy, scale, tp=r, tq=tn, tm=tm, out_dtype=b.dtype,
                interpret=cfg.interpret)
  # W is frozen; the zero cotangent is dead code under jit.
  return dx, jnp.zeros_like(w), da, db


_lora_aligned.defvjp(_lora_aligned_fwd, _lora_aligned_bwd)


def lora_matmul(x: jax.Array, w: jax.Array, a: jax.Array, b: jax.Array,
                scale: float, *,
                impl: Literal["pallas", "reference"] = "pallas",
                block_m: int | None = None, block_n: int | None = None,
                block_k: int | None = None,
                interpret: bool | None = None) -> jax.Array:
  """`y = x @ W + scale * (x @ A) @ B` with W frozen (no gradient).

  Args:
    x: `[..., d_in]` activations, fp32 or bf16; leading dims flatten to M.
    w: `[d_in, d_out]` frozen base weight.
    a: `[d_in, r]` LoRA down projection.
    b: `[r, d_out]` LoRA up projection.
    scale: static Python float (alpha / r); baked into the kernel.
    impl: "pallas" (fused kernel, custom VJP) or "reference" (jnp).
    block_m, block_n, block_k: tile overrides; default from
      `default_block_sizes(jax.default_backend(), M, d_out, d_in)`.
    interpret: Pallas interpret mode; None = interpret iff backend is CPU.

  Returns:
    `[..., d_out]` in x.dtype (fp32 accumulation). Gradients flow to x, a, b;
    W's gradient is zero (it is frozen).
  """
  d_in = x.shape[-1]
  if w.ndim != 2 or w.shape[0] != d_in:
    raise ValueError(f"w must be [d_in={d_in}, d_out], got {w.shape}")
  d_out = w.shape[1]
  if a.ndim != 2 or a.shape[0] != d_in:
    raise ValueError(f"a must be [d_in={d_in}, r], got {a.shape}")
  r = a.shape[1]
  if b.shape != (r, d_out):
    raise ValueError(f"b must be [r={r}, d_out={d_out}], got {b.shape}")
  scale = float(scale)
  if impl == "reference":
    return lora_matmul_reference(x, lax.stop_gradient(w), a, b, scale)
  if impl != "pallas":
    raise ValueError(f"impl must be 'pallas' or 'reference', got {impl!r}")

  lead = x.shape[:-1]
  x2 = x.reshape(-1, d_in)
  m = x2.shape[0]
  backend = jax.default_backend()
  d = _tiling.default_block_sizes(backend, m, d_out, d_in)
  blocks = BlockSizes(block_m or d.tm, block_n or d.tn, block_k or d.tk)
  mp, np_, kp = (round_up(m, blocks.tm), round_up(d_out, blocks.tn),
                 round_up(d_in, blocks.tk))
  rp = _tiling.padded_rank(backend, r)
  # Zero padding is exact for every path: padded K rows/cols contribute 0,
  # padded rank columns of A (rows of B) contribute 0, padded M/N are
  # sliced off. Padding outside the custom VJP lets autodiff slice the
  # gradients back for free.
  xp = pad_axis(pad_axis(x2, 0, mp), 1, kp)
  wp = pad_axis(pad_axis(w, 0, kp), 1, np_)
  ap = pad_axis(pad_axis(a, 0, kp), 1, rp)
  bp = pad_axis(pad_axis(b, 0, rp), 1, np_)
  cfg = _Cfg(blocks, _tiling.resolve_interpret(interpret))
  y = _lora_aligned(xp, wp, ap, bp, scale, cfg)
  return y[:m, :d_out].reshape(*lead, d_out)
