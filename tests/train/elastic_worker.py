"""A pretrain stage on N processes for tests/train/test_elastic_resume.py (run as a script: the
device count and the distributed runtime are fixed when jax starts; `run` is also called in
the test's own process, as the 1-process run).

  python tests/train/elastic_worker.py TOKENIZER WORKDIR [--coordinator=127.0.0.1:PORT
      --num_processes=N --process_id=I]

Each process has 1 CPU device; the mesh is FSDP over all of them, so parameters and optimizer
state are split differently for every process count. Runs (or resumes) a 4-step pretrain
stage checkpointing every 2 steps; process 0 prints one JSON line: a digest of every global
batch a step (then the final evaluation) saw, in order.
"""

import argparse
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

STEPS, EVERY = 4, 2


def stage(tokenizer_path):
  from llmjax.data import pipeline
  from llmjax.stages.context import TokenizerConfig
  from llmjax.stages.pretrain import Pretrain
  from llmjax.train import loop
  from llmjax.train.optimizer import OptimizerConfig
  from tests.conftest import TEST_MODEL

  return Pretrain(
      model=TEST_MODEL,
      data=pipeline.DataConfig(seq_len=32, batch_size=4, eval_documents=40, eval_batches=1),
      train=loop.TrainConfig(total_steps=STEPS, log_every=1, eval_every=STEPS,
                             checkpoint_every=EVERY),
      optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
      tokenizer=TokenizerConfig(path=tokenizer_path))


def run(tokenizer_path, workdir):
  """Runs (or resumes) the stage in `workdir` on every process of this jax runtime; the
  digests of the global batches the loop put on the devices, in order."""
  import numpy as np
  from jax.experimental import multihost_utils

  from llmjax.parallel import mesh as mesh_lib
  from llmjax.stages import RunContext, run_stages
  from llmjax.train import loop

  seen = []
  to_step = loop.step_batch

  def recording(batch, sharding):  # what the step sees: the global arrays
    arrays = to_step(batch, sharding)
    digest = hashlib.sha256()
    for k in sorted(arrays):
      digest.update(k.encode())
      digest.update(np.asarray(multihost_utils.process_allgather(arrays[k], tiled=True)).tobytes())
    seen.append(digest.hexdigest()[:16])
    return arrays

  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=-1, tensor=1))
  loop.step_batch = recording
  try:
    run_stages([stage(tokenizer_path)], RunContext(workdir=str(workdir), mesh=mesh,
                                                   rules="fsdp_tensor"))
  finally:
    loop.step_batch = to_step
  return seen


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("tokenizer")
  parser.add_argument("workdir")
  parser.add_argument("--coordinator", default=None)
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  args = parser.parse_args()
  # Added to the suite's XLA flags (tests/conftest.py), not replacing them.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=1")
  os.environ["JAX_PLATFORMS"] = "cpu"

  import jax
  import orbax.checkpoint  # noqa: F401 -- defines the flag below
  from absl import flags
  from jax._src import distributed as jax_distributed
  from llmjax.parallel import distributed

  # The first collective over a set of devices waits at most 30 s (gloo's rendezvous) for
  # every process to reach it; a loaded machine puts processes further apart than that
  # (process 0 loads its programs from the suite's compilation cache, the others compile).
  # So orbax's barriers go through the coordination service instead of a device collective,
  # and every process starts the run at one barrier: the first collective finds them
  # together. Later collectives wait as long as they need.
  flags.FLAGS(["elastic_worker", "--experimental_orbax_use_distributed_barrier"])
  distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  jax_distributed.global_state.client.wait_at_barrier("elastic_worker_start", 600_000)
  seen = run(args.tokenizer, args.workdir)
  if jax.process_index() == 0:
    print(json.dumps(seen))


if __name__ == "__main__":
  main()
