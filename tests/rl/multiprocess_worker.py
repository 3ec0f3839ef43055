"""GRPO across processes: sampling and a short grpo stage, run as a script in a fresh process
(the device count and the distributed runtime are fixed when jax starts).

  python tests/rl/multiprocess_worker.py TOKENIZER WORKDIR OUT --devices=2 \
      [--coordinator=127.0.0.1:PORT --num_processes=2 --process_id=I]

Samples 4 prompts (each process passing its share) from a tiny model FSDP-sharded over all
devices, then runs 2 grpo steps (one rollout in 2 minibatches) on the same mesh; writes this
process's samples and the run's final parameters to OUT (npz) and a JSON line to stdout.
"""

import argparse
import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("tokenizer")
  parser.add_argument("workdir")
  parser.add_argument("out")
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument("--sample_only", action="store_true")
  args = parser.parse_args()
  # Added to the suite's XLA flags (tests/conftest.py), not replacing them.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"

  import jax
  import numpy as np
  from flax import nnx
  from jax.experimental import multihost_utils

  from llmjax.data.tokenizer import Tokenizer
  from llmjax.metrics import read_metrics
  from llmjax.model.transformer import build_model
  from llmjax.parallel import distributed, mesh as mesh_lib
  from llmjax.sample.sampler import Sampler, sample_per_process
  from llmjax.stages import RunContext, run_stages
  from tests.conftest import TEST_MODEL
  from tests.rl.test_grpo_stage import stage

  if args.coordinator:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=jax.device_count(), tensor=1))
  rules = mesh_lib.RULE_SETS["fsdp_tensor"]
  pid, n = jax.process_index(), jax.process_count()

  tokenizer = Tokenizer.load(args.tokenizer)
  graphdef, params = nnx.split(build_model(TEST_MODEL, seed=3))
  params = jax.jit(lambda p: p, out_shardings=mesh_lib.param_shardings(params, mesh, rules))(
      params)
  prompts = [[tokenizer.bos_id] + list(range(10 + i, 13 + 2 * i)) for i in range(4)]
  mine = prompts[pid * 4 // n:(pid + 1) * 4 // n]
  with mesh_lib.activation_sharding(mesh, rules):
    out = sample_per_process(Sampler(graphdef, params, tokenizer), mine, max_new_tokens=8,
                             num_samples=2, temperature=1.0, seed=7)

  samples = dict(tokens=out.tokens, lengths=out.lengths, logprobs=out.logprobs)
  if args.sample_only:
    np.savez(args.out, **samples)
    return
  # One rollout in 2 minibatches (old log-probs computed across processes), then an eval.
  st = stage(args.tokenizer, steps_per_generation=2)
  st = dataclasses.replace(st, train=dataclasses.replace(st.train, total_steps=2, eval_every=2,
                                                         checkpoint_every=2))
  ctx = run_stages([st],
                   RunContext(workdir=args.workdir, mesh=mesh, rules="fsdp_tensor"))
  final = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
           for x in jax.tree.leaves(ctx.outputs["grpo"].params)]
  records = read_metrics(args.workdir) if pid == 0 else []
  np.savez(args.out, *final, **samples)
  print(json.dumps({
      "train_steps": [r["step"] for r in records if r["kind"] == "train"],
      "losses": [r["loss"] for r in records if r["kind"] == "train"],
      "rollout_steps": [r["step"] for r in records if "rollout_seconds" in r],
      "accuracy_n": [r["accuracy_n"] for r in records if r["kind"] == "eval"],
      "specs": sorted({str(x.sharding.spec) for x in jax.tree.leaves(ctx.outputs["grpo"].params)}),
  }))


if __name__ == "__main__":
  main()
