"""Pipeline step time vs microbatch count, against the bubble formula (p-1)/(r*m+p-1).

Runs on 8 simulated CPU devices (set before jax starts): a forward + backward pass of the
LM loss over one global batch, on a (stage=p, data=8/p) mesh for each microbatch count m,
and the same batch unpipelined on (data=8) as the bubble-free reference. Prints a markdown
table for bench/RESULTS.md.

On simulated devices every device shares the host's cores, so time follows the total work
done. A pipelined step does p stages x (r*m + p - 1) ticks of a microbatch each, bubble ticks
included (they compute on stale activations and are thrown away), where the reference does
the batch once: the measured bubble is 1 - t_reference / t_pipelined, against the formula.
On real devices the stages run in parallel and the same ratio holds per device: a tick takes
as long whether the stage works or waits.

  python bench/pipeline_bubble.py --stages=4 --microbatches=1,2,4,8,16
"""

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from llmjax.model.config import ModelConfig  # noqa: E402
from llmjax.model.transformer import build_model  # noqa: E402
from llmjax.parallel import mesh as mesh_lib  # noqa: E402
from llmjax.parallel.pipeline import bubble_fraction  # noqa: E402
from llmjax.train.losses import lm_loss  # noqa: E402


def timed_step(cfg, params, batch, mesh_cfg, repeats):
  """(median seconds of a jitted loss+gradient step, compile seconds) on `mesh_cfg`."""
  graphdef = nnx.split(build_model(cfg, seed=0))[0]
  mesh, rules = mesh_lib.make_mesh(mesh_cfg), mesh_lib.RULE_SETS["fsdp_tensor"]
  p_shard = mesh_lib.param_shardings(params, mesh, rules)
  b_shard = mesh_lib.batch_sharding(mesh, rules)

  def step(p, b):
    with mesh_lib.activation_sharding(mesh, rules, mesh_cfg.pipeline()):
      return jax.value_and_grad(lambda q: lm_loss(nnx.merge(graphdef, q), b)[0])(p)
  args = (jax.device_put(params, p_shard), jax.device_put(batch, b_shard))
  start = time.perf_counter()
  fn = jax.jit(step, in_shardings=(p_shard, b_shard)).lower(*args).compile()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  # The minimum: the cores are shared with other jobs, which only ever add time.
  return min(times), statistics.median(times), compile_s


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--stages", type=int, default=4)
  parser.add_argument("--microbatches", default="1,2,4,8,16")
  parser.add_argument("--schedule", default="gpipe")
  parser.add_argument("--circular_repeats", type=int, default=2)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--d_model", type=int, default=256)
  parser.add_argument("--rows", type=int, default=32)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  cfg = ModelConfig(vocab_size=256, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                    n_kv_heads=4, d_ff=4 * args.d_model, max_seq_len=args.seq_len,
                    remat="full")
  params = nnx.split(build_model(cfg, seed=0))[1]
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 256, (args.rows, args.seq_len + 1), dtype=np.int32)
  batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
           "loss_mask": np.ones((args.rows, args.seq_len), np.int32),
           "segment_ids": np.ones((args.rows, args.seq_len), np.int32),
           "positions": np.tile(np.arange(args.seq_len, dtype=np.int32), (args.rows, 1))}
  p = args.stages
  reference, _, _ = timed_step(cfg, params, batch, mesh_lib.MeshConfig(data=8), args.repeats)
  r = args.circular_repeats if args.schedule == "circular" else 1
  print(f"{args.layers} layers, d_model {args.d_model}, batch {args.rows}x{args.seq_len}, "
        f"{args.schedule}, {p} stages x {8 // p} data; unpipelined (data=8): "
        f"{1000 * reference:.0f} ms\n")
  print("| m | ticks | step (min) | step (median) | t / t_unpipelined | measured bubble "
        "| formula (p-1)/(r*m+p-1) | compile |")
  print("|---|---|---|---|---|---|---|---|")
  for m in (int(x) for x in args.microbatches.split(",")):
    mesh_cfg = mesh_lib.MeshConfig(stage=p, data=8 // p, num_microbatches=m,
                                   pipeline_schedule=args.schedule,
                                   circular_repeats=args.circular_repeats)
    best, median, compile_s = timed_step(cfg, params, batch, mesh_cfg, args.repeats)
    print(f"| {m} | {r * m + p - 1} | {1000 * best:.0f} ms | {1000 * median:.0f} ms "
          f"| {best / reference:.2f} | {100 * (1 - reference / best):.1f}% "
          f"| {100 * bubble_fraction(p, m, r):.1f}% | {compile_s:.0f} s |", flush=True)


if __name__ == "__main__":
  main()
