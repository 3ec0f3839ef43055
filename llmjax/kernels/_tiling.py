"""Shared tiling, padding and dot helpers for the Pallas kernels.

Backend notes (the reason block sizes live in one place):

* TPU (Mosaic): the last two dims of every block must be multiples of
  (8, 128) -- sublanes x lanes -- or equal the full array dims; bf16 packs
  two rows per sublane so 16 rows is the natural minimum there. The MXU is
  128x128 (256x256 on v6e), so tn/tk of 256-512 keep it busy. Blocks live
  in VMEM (16 MiB default scoped limit on v5e, 32 MiB on v6e), double
  buffered, which caps the full-K blocks the kernels use.
* GPU (Triton): every array a kernel loads, stores or feeds to a dot must
  have a power-of-two size, and tensor-core dots want every dim >= 16.
  Triton has no VMEM-style scratch (``scratch_shapes`` is TPU-only) and the
  grid is fully parallel, so the kernels keep the whole reduction loop in
  the kernel body (``lax.fori_loop`` over ``pl.ds`` slices of a full-K
  ref) instead of accumulating across a K grid axis.
* CPU: interpret mode only. The grid runs sequentially, so fewer, larger
  tiles are faster; tests pass small explicit block sizes to exercise the
  multi-tile and padding paths.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes: `tm` rows of x, `tn` output columns, `tk` reduction depth."""
  tm: int
  tn: int
  tk: int


def resolve_interpret(interpret: bool | None) -> bool:
  """`None` means interpret exactly when there is no Pallas-capable backend."""
  if interpret is None:
    return jax.default_backend() == "cpu"
  return bool(interpret)


def round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def next_pow2(x: int) -> int:
  return 1 << max(0, (x - 1).bit_length())


def _largest_dividing_pow2(dim: int, preferred: int, minimum: int) -> int | None:
  """Largest power of two in [minimum, preferred] dividing `dim`, if any."""
  b = preferred
  while b >= minimum:
    if dim % b == 0:
      return b
    b //= 2
  return None


def _weight_dim_block(backend: str, dim: int, preferred: int) -> int:
  """Block for a weight dim (N or K); prefers a divisor so weights need no pad.

  Padding a frozen weight copies it on every call, which for a memory-bound
  decode matmul costs as much as the matmul itself, so a smaller block that
  divides the dim beats a larger one that needs padding.
  """
  if backend == "tpu":
    b = _largest_dividing_pow2(dim, preferred, 128)
    return b if b is not None else min(preferred, round_up(dim, 128))
  if backend == "gpu":
    b = _largest_dividing_pow2(dim, preferred, 16)
    return b if b is not None else min(preferred, max(16, next_pow2(dim)))
  # CPU interpret: any size works; cover small dims in one tile.
  b = _largest_dividing_pow2(dim, preferred, 8)
  return b if b is not None else min(preferred, round_up(dim, 8))


def default_block_sizes(backend: str, m: int, n: int, k: int) -> BlockSizes:
  """Tile sizes for an `[m, k] @ [k, n]` kernel on `backend`.

  Args:
    backend: "tpu", "gpu" (Triton) or "cpu" (interpret mode); "cuda"/"rocm"
      are treated as "gpu".
    m: rows of the activation (tokens). Padded to `tm`; padding activations
      is cheap compared with padding weights.
    n: output columns (weight dim, preferably divided exactly).
    k: reduction depth (weight dim, preferably divided exactly).
  """
  backend = "gpu" if backend in ("cuda", "rocm", "gpu") else backend
  if backend == "tpu":
    # 16 rows: bf16 sublane packing; 256-512 wide blocks for the MXU.
    tm = min(256, round_up(m, 16))
    return BlockSizes(tm, _weight_dim_block("tpu", n, 512),
                      _weight_dim_block("tpu", k, 512))
  if backend == "gpu":
    # Powers of two >= 16 (Triton tensor-core dots); 64-deep K steps keep
    # register pressure of the fp32 accumulator + two operand tiles low.
    # Decode (small m) is bandwidth bound and has a single M tile, so the
    # N tiles alone must fill the SMs (132 on H100): 64-wide tiles give
    # d_out=11008 172 programs where 128-wide would leave SMs idle.
    tm = min(128, max(16, next_pow2(m)))
    tn = 64 if m <= 64 else 128
    return BlockSizes(tm, _weight_dim_block("gpu", n, tn),
                      _weight_dim_block("gpu", k, 64))
  tm = min(128, round_up(m, 8))
  return BlockSizes(tm, _weight_dim_block("cpu", n, 256),
                    _weight_dim_block("cpu", k, 256))


def padded_rank(backend: str, r: int) -> int:
  """LoRA rank after zero padding (exact: padded A cols / B rows are zero)."""
  backend = "gpu" if backend in ("cuda", "rocm", "gpu") else backend
  if backend == "gpu":
    return max(16, next_pow2(r))  # Triton dot dims: power of two, >= 16.
  if backend == "tpu":
    return round_up(r, 128)  # lane dim; the MXU pads to 128 anyway.
  return r


def pad_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
  """Zero-pads `x` along `axis` up to `size` (no-op when already there)."""
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False,
        trans_b: bool = False) -> jax.Array:
  """2-D dot with fp32 accumulation, usable inside a kernel body.

  fp32 operands request HIGHEST precision: Triton otherwise lowers an fp32
  dot to TF32 (10-bit mantissa), which would break fp32 parity.
  """
  contract = ((0 if trans_a else 1,), (1 if trans_b else 0,))
  precision = (lax.Precision.HIGHEST if a.dtype == jnp.float32
               else lax.Precision.DEFAULT)
  return lax.dot_general(a, b, (contract, ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)


def compiler_params(interpret: bool, dimension_semantics: tuple[str, ...]):
  """Per-backend `compiler_params` for `pl.pallas_call` (None = defaults).

  GPU: jax >= 0.10 lowers `pallas_call` to Mosaic GPU unless Triton
  params are passed; Mosaic GPU wants a different (warpgroup / TMA) kernel
  style, so the kernels here explicitly select Triton.
  TPU: `dimension_semantics` tells Mosaic which grid axes may be split
  across TensorCores ("parallel") and which must run in order
  ("arbitrary").
  """
  if interpret:
    return None
  backend = jax.default_backend()
  if backend == "gpu":
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=4, num_stages=3)
  if backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics)
  return None
