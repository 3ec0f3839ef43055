"""GRPO with two processes (2 CPU devices each, FSDP over all 4, jax.distributed on
127.0.0.1): sampling from a model sharded over both processes equals one process sampling
the same prompts, and the grpo stage runs with each process bringing its own prompts."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.parallel.test_sharding import free_port

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multiprocess_worker.py")


def start(*args):
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  return json.loads(out.strip().splitlines()[-1]) if out.strip() else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer_path):
  tmp = tmp_path_factory.mktemp("grpo_multiprocess")
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [start(tokenizer_path, tmp / "multi", tmp / f"multi{i}.npz", "--devices=2",
                 f"--coordinator={coordinator}", "--num_processes=2", f"--process_id={i}")
           for i in range(2)]
  single = start(tokenizer_path, tmp / "single", tmp / "single.npz", "--devices=4",
                 "--sample_only")
  results = [finish(p) for p in procs]
  finish(single)
  return tmp, results


def test_sampling_across_processes_equals_one_process(runs):
  tmp, _ = runs
  with np.load(tmp / "multi0.npz") as a, np.load(tmp / "multi1.npz") as b, \
      np.load(tmp / "single.npz") as one:
    # Each process got the completions of its own two prompts, as one process samples them.
    for key in ("tokens", "lengths"):
      np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), one[key])
    np.testing.assert_allclose(np.concatenate([a["logprobs"], b["logprobs"]]), one["logprobs"],
                               atol=1e-5)
    assert one["lengths"].sum() > 0 and not np.array_equal(a["tokens"], b["tokens"])


def test_grpo_stage_runs_on_two_processes(runs):
  tmp, (chief, other) = runs
  assert chief["train_steps"] == [1, 2]
  assert all(np.isfinite(chief["losses"]))
  assert chief["rollout_steps"] == [1]  # one rollout fed both steps (2 minibatches)
  assert chief["accuracy_n"] == [4]  # both processes' held-out prompts counted
  assert any("fsdp" in s for s in chief["specs"])
  with np.load(tmp / "multi0.npz") as a, np.load(tmp / "multi1.npz") as b:
    arrays = [k for k in a.files if k.startswith("arr_")]
    assert arrays
    for k in arrays:  # one model, whichever process reads it
      np.testing.assert_array_equal(a[k], b[k])
