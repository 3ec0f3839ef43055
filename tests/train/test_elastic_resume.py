"""A run saved by 2 processes resumes on 1 and on 4 with the same batches and optimizer state.

tests/train/elastic_worker.py runs a 4-step pretrain stage on N processes of 1 CPU device
each (jax.distributed on 127.0.0.1, FSDP over all devices, so the parameters and the
optimizer state are split differently for each N). The reference runs uninterrupted on 2
processes, checkpointing at steps 2 and 4. Each resumed run starts from a copy of its workdir
without the step-4 checkpoint (what a kill right after the step-2 checkpoint leaves): on 4
processes, and on 1 (this test's own process, while the 4 run).

Tolerance: the resumed steps sum each gradient over 1 or 4 devices instead of 2, in another
order, so the final state is not bit-equal to the reference (measured: largest difference
5.8e-7, on 4 processes; 6e-8 on 1). Floats must agree to 5e-6, 2000x below what one step
moves a weight (about the learning rate, 1e-2, under Adam): with the row streams made to
depend on the process count, the resumed runs read other batches and ended 1.4e-2 off.
Integers (step, Adam's count, RNG key) must be equal.

The SFT and preference data orders restore across process counts through the same
`checkpoint.DataHandler` (tests/data/test_global_order.py, in one process).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llmjax.metrics import read_metrics
from tests.parallel.test_sharding import free_port
from tests.train import elastic_worker

WORKER = os.path.abspath(elastic_worker.__file__)
STAGE = "pretrain"


def launch(tokenizer_path, workdir, processes):
  coordinator = f"127.0.0.1:{free_port()}"
  return [subprocess.Popen([sys.executable, WORKER, tokenizer_path, str(workdir),
                            f"--coordinator={coordinator}", f"--num_processes={processes}",
                            f"--process_id={i}"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(processes)]


def finish(procs):
  """Process 0's JSON line: the digests of the global batches, in order."""
  outs = []
  for p in procs:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-4000:]
    outs.append(out)
  return json.loads(outs[0].strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
  assert jax.process_count() == 1
  tmp = tmp_path_factory.mktemp("elastic")
  reference = finish(launch(tokenizer_path, tmp / "reference", 2))
  for n in (1, 4):
    shutil.copytree(tmp / "reference", tmp / f"resumed{n}")
    shutil.rmtree(tmp / f"resumed{n}" / "checkpoints" / STAGE / "4")
  four = launch(tokenizer_path, tmp / "resumed4", 4)
  one = elastic_worker.run(tokenizer_path, tmp / "resumed1")
  return tmp, reference, {1: one, 4: finish(four)}


def checkpoint_item(workdir, item, step=4):
  """A checkpoint item as {path: numpy array}, read without any device layout."""
  path = os.path.join(workdir, "checkpoints", STAGE, str(step), item)
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  restored = checkpointer.restore(
      path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(restored)}


def final_state(workdir):
  return {**checkpoint_item(workdir, "params"), **checkpoint_item(workdir, "train")}


@pytest.mark.parametrize("processes", [1, 4])
def test_resumed_steps_see_the_uninterrupted_runs_batches(runs, processes):
  _, reference, resumed = runs
  # 4 steps and the final evaluation, each batch new; the resumed run redoes steps 3 and 4.
  assert len(reference) == 5 and len(set(reference[:4])) == 4
  assert resumed[processes] == reference[2:]


@pytest.mark.parametrize("processes", [1, 4])
def test_resumed_state_equals_the_uninterrupted_runs(runs, processes):
  tmp, _, _ = runs
  expected, got = final_state(tmp / "reference"), final_state(tmp / f"resumed{processes}")
  assert got.keys() == expected.keys()
  assert any("['mu']" in k for k in got) and any("['nu']" in k for k in got)
  for k, v in expected.items():
    if v.dtype.kind in "iu":  # step, Adam's count, RNG key, divergence mark
      np.testing.assert_array_equal(got[k], v, err_msg=k)
    else:  # see the module doc
      np.testing.assert_allclose(got[k], v, rtol=0, atol=5e-6, err_msg=k)
  assert int(got["['step']"]) == 4 and int(got["['opt_state'][1][0]['count']"]) == 4


@pytest.mark.parametrize("processes", [1, 4])
def test_resumed_run_continues_the_step_count(runs, processes):
  tmp, _, resumed = runs
  assert len(resumed[processes]) == 3  # steps 3 and 4 and the evaluation: not from step 0
  steps = [r["step"] for r in read_metrics(str(tmp / f"resumed{processes}"))
           if r["kind"] == "train"]
  assert steps == [1, 2, 3, 4]
