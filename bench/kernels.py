"""Benchmark the Pallas int4 and fused-LoRA kernels against XLA baselines.

Usage (GPU/TPU):  python bench/kernels.py
       (CPU)      python bench/kernels.py --smoke   # tiny shapes, interpret

Prints markdown tables:
* int4_matmul (Pallas) vs XLA bf16 `jnp.dot` on the unquantized weight, with
  achieved bytes/s against a measured HBM bandwidth (large device-side
  read+write of one buffer). Decode (small M) is memory bound, so the int4
  kernel's ceiling is ~4x fewer weight bytes than bf16.
* fused LoRA kernel vs base matmul alone vs the unfused three-matmul XLA
  path (rank 16), forward and forward+backward (grads for x, A, B).

Timing: jit, warm up, then the median over `--trials` of the mean time of
`--reps` back-to-back calls (block_until_ready on the last). Back-to-back
dispatch hides Python launch overhead for the microsecond-scale decode ops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from llmjax.kernels import int4_matmul, lora_matmul, quantize_int4  # noqa: E402


def time_fn(fn: Callable[..., Any], *args, warmup: int, trials: int,
            reps: int) -> float:
  """Median seconds per call of jitted `fn(*args)`."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  samples = []
  for _ in range(trials):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = fn(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / reps)
  return statistics.median(samples)


def measure_hbm_bandwidth(nbytes: int, **timing) -> float:
  """Bytes/s of a device-side elementwise pass (reads + writes nbytes)."""
  x = jnp.zeros((nbytes // 4,), jnp.float32)
  # `+ 1` rather than a bare copy so XLA cannot alias the output to x.
  t = time_fn(jax.jit(lambda v: v + 1.0), x, **timing)
  return 2 * nbytes / t


def _fmt_us(t: float) -> str:
  return f"{t * 1e6:,.1f}"


def bench_int4(shapes, hbm: float, group_size: int, interpret: bool | None,
               **timing) -> list[str]:
  rows = ["| M | d_in | d_out | bf16 dot (us) | int4 pallas (us) | speedup "
          "| int4 GB/s | % HBM | bf16 GB/s | % HBM |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  key = jax.random.PRNGKey(0)
  for m, k, n in shapes:
    kx, kw = jax.random.split(jax.random.fold_in(key, m * n + k))
    w = (jax.random.normal(kw, (k, n), jnp.float32) / k**0.5).astype(
        jnp.bfloat16)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    q = quantize_int4(w, group_size, "int4")
    t_bf16 = time_fn(jax.jit(jnp.dot), x, w, **timing)
    t_int4 = time_fn(jax.jit(lambda x, q: int4_matmul(
        x, q, interpret=interpret)), x, q, **timing)
    act = 2 * m * (k + n)  # bf16 x in, y out
    b_int4 = q.packed.size + q.scales.size * q.scales.dtype.itemsize + act
    b_bf16 = 2 * k * n + act
    gi, gb = b_int4 / t_int4, b_bf16 / t_bf16
    rows.append(
        f"| {m} | {k} | {n} | {_fmt_us(t_bf16)} | {_fmt_us(t_int4)} | "
        f"{t_bf16 / t_int4:.2f}x | {gi / 1e9:,.1f} | {100 * gi / hbm:.0f}% | "
        f"{gb / 1e9:,.1f} | {100 * gb / hbm:.0f}% |")
  return rows


def bench_lora(shapes, rank: int, interpret: bool | None,
               **timing) -> list[str]:
  rows = ["| M | d_in | d_out | base dot (us) | unfused XLA (us) "
          "| fused pallas (us) | fwd+bwd unfused (us) "
          "| fwd+bwd pallas (us) |",
          "|---|---|---|---|---|---|---|---|"]
  scale = 2.0
  key = jax.random.PRNGKey(1)

  def unfused(x, w, a, b):
    return x @ w + (scale * (x @ a)) @ b

  def fused(x, w, a, b):
    return lora_matmul(x, w, a, b, scale, interpret=interpret)

  def fwd_bwd(fn):
    def loss(x, a, b, w):
      return jnp.sum(fn(x, w, a, b).astype(jnp.float32))
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  for m, k, n in shapes:
    ks = jax.random.split(jax.random.fold_in(key, m * n + k), 4)
    x = jax.random.normal(ks[0], (m, k), jnp.bfloat16)
    w = (jax.random.normal(ks[1], (k, n)) / k**0.5).astype(jnp.bfloat16)
    a = (jax.random.normal(ks[2], (k, rank)) / k**0.5).astype(jnp.bfloat16)
    b = (jax.random.normal(ks[3], (rank, n)) * 0.01).astype(jnp.bfloat16)
    t_base = time_fn(jax.jit(jnp.dot), x, w, **timing)
    t_unf = time_fn(jax.jit(unfused), x, w, a, b, **timing)
    t_fus = time_fn(jax.jit(fused), x, w, a, b, **timing)
    t_unf_bw = time_fn(fwd_bwd(unfused), x, a, b, w, **timing)
    t_fus_bw = time_fn(fwd_bwd(fused), x, a, b, w, **timing)
    rows.append(
        f"| {m} | {k} | {n} | {_fmt_us(t_base)} | {_fmt_us(t_unf)} | "
        f"{_fmt_us(t_fus)} | {_fmt_us(t_unf_bw)} | {_fmt_us(t_fus_bw)} |")
  return rows


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes in interpret mode (CPU sanity run)")
  p.add_argument("--trials", type=int, default=None)
  p.add_argument("--reps", type=int, default=None)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--group-size", type=int, default=128)
  p.add_argument("--rank", type=int, default=16)
  args = p.parse_args(argv)

  backend = jax.default_backend()
  if args.smoke:
    d_in, d_outs, ms = 256, (256, 384), (1, 8)
    lora_shapes = [(8, 256, 384)]
    hbm_bytes, interpret = 64 << 20, True
    trials, reps, rank = args.trials or 3, args.reps or 2, min(args.rank, 8)
  else:
    if backend == "cpu":
      print("No accelerator found; use --smoke for a CPU sanity run.")
      sys.exit(1)
    d_in, d_outs, ms = 4096, (11008, 14336), (1, 8, 32, 2048)
    lora_shapes = [(m, d_in, n) for m in (1, 32, 2048) for n in d_outs]
    hbm_bytes, interpret = 2 << 30, None
    trials, reps, rank = args.trials or 15, args.reps or 20, args.rank
  timing = dict(warmup=args.warmup, trials=trials, reps=reps)

  print(f"# llmjax kernel benchmark ({jax.devices()[0].device_kind}, "
        f"backend={backend}, jax {jax.__version__}"
        f"{', smoke/interpret' if args.smoke else ''})\n")
  hbm = measure_hbm_bandwidth(hbm_bytes, **timing)
  print(f"Measured memory bandwidth (read+write of {hbm_bytes >> 20} MiB): "
        f"{hbm / 1e9:,.1f} GB/s\n")
  print(f"## int4_matmul (group_size={args.group_size}) vs bf16 jnp.dot\n")
  shapes = [(m, d_in, n) for n in d_outs for m in ms]
  print("\n".join(bench_int4(shapes, hbm, args.group_size, interpret,
                             **timing)))
  print(f"\n## LoRA rank {rank}: fused kernel vs base vs unfused\n")
  print("\n".join(bench_lora(lora_shapes, rank, interpret, **timing)))


if __name__ == "__main__":
  main()
