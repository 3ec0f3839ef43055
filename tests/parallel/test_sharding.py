"""Sharded == unsharded, on 8 simulated CPU devices and across two processes.

Each case runs tests/parallel/worker.py in a fresh interpreter: the number of CPU devices and
the distributed runtime are fixed when jax starts.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

# Targets per step of the worker's batches (8 rows x 32 positions, none masked).
GLOBAL_TARGETS = 8 * 32
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")


def worker(*args, timeout=600):
  return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-4000:]
  return out


def load(path):
  with np.load(path) as z:
    params = [z[f"arr_{i}"] for i in range(len(z.files))]
  with open(path + ".json") as f:
    return params, json.load(f)


@pytest.fixture(scope="module")
def eight_devices():
  """The worker's 8-device checks (meshes, accum on 4,1,2, sample on 1,2,4), one process."""
  return json.loads(finish(worker("eight", "--devices=8")).strip().splitlines()[-1])


@pytest.fixture(scope="module")
def mesh_results(eight_devices):
  return eight_devices["meshes"]


EXPECTED_SPECS = {
    # Pure data parallelism: every parameter replicated.
    "8,1,1": {"embed": "P(None, None)", "q_proj": "P(None, None, None)",
              "down_proj": "P(None, None)", "norm": "P(None,)"},
    # FSDP: the `embed` dimension of every matrix split over fsdp.
    "1,8,1": {"embed": "P(None, 'fsdp')", "q_proj": "P('fsdp', None, None)",
              "down_proj": "P(None, 'fsdp')", "norm": "P(None,)"},
    # Tensor parallel: heads, mlp and vocab split; 4 KV heads don't divide 8, so replicated.
    "1,1,8": {"embed": "P('tensor', None)", "q_proj": "P(None, 'tensor', None)",
              "k_proj": "P(None, None, None)", "down_proj": "P('tensor', None)"},
    "2,2,2": {"embed": "P('tensor', 'fsdp')", "q_proj": "P('fsdp', 'tensor', None)",
              "k_proj": "P('fsdp', 'tensor', None)", "down_proj": "P('tensor', 'fsdp')"},
}


@pytest.mark.parametrize("mesh", sorted(EXPECTED_SPECS))
def test_loss_and_gradients_match_one_device(mesh_results, mesh):
  r = mesh_results[mesh]
  # float32 sums reduced in a different order: relative error ~1e-7 per op, a few ulps here.
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
  assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"] + 1e-6
  for name, spec in EXPECTED_SPECS[mesh].items():
    assert r["specs"][name] == spec, (mesh, name)
  # With the vocab split over `tensor`, the loss runs per device under shard_map.
  assert r["vocab_parallel_loss"] == (mesh in ("1,1,8", "2,2,2"))


# Expert-parallel meshes (data, fsdp, tensor, expert): the experts split over `expert`, their
# `embed` over fsdp and hidden units over tensor at rest; the batch over data x fsdp x expert.
MOE_SPECS = {
    "2,1,1,4": ("P('expert', None, None)", "P(('data', 'expert'),)"),
    "1,2,2,2": ("P('expert', 'fsdp', 'tensor')", "P(('fsdp', 'expert'),)"),
    "1,2,1,4": ("P('expert', 'fsdp', None)", "P(('fsdp', 'expert'),)"),
}


@pytest.mark.parametrize("case", ["dropless:2,1,1,4", "dropless:1,2,2,2", "capacity:1,2,1,4"])
def test_expert_parallel_moe_matches_one_device(mesh_results, case):
  r = mesh_results["moe"][case]
  mesh = case.split(":")[1]
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
  assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"] + 1e-7
  assert r["router_grad_max_abs"] > 0
  assert r["dropped"] == r["ref_dropped"] and (r["dropped"] > 0) == case.startswith("capacity")
  gate_spec, batch_spec = MOE_SPECS[mesh]
  assert r["gate_spec"] == gate_spec and r["batch_spec"] == batch_spec
  assert r["local_experts"] == 8 // int(mesh.split(",")[3])  # each device holds its share
  assert r["shard_map"]


def test_microbatch_rows_replicated_over_data_are_counted_once(eight_devices):
  # grad_accum 4 on 8 rows: 2 rows per microbatch over 4 data devices (mesh 4,1,2), so each
  # microbatch is replicated over `data` while the vocab-parallel loss runs under shard_map.
  r = eight_devices["accum"]
  assert r["vocab_parallel_loss"]
  m, ref = r["metrics"], r["ref_metrics"]
  assert ref["target_tokens"] == r["expected_count"]
  assert m["target_tokens"] == ref["target_tokens"]  # not 4x: one count per row, not per replica
  assert m["loss"] == pytest.approx(ref["loss"], rel=1e-6)
  assert m["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5)
  assert r["update_max_abs_diff"] <= 1e-5 * r["update_max_abs"] + 1e-7


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """2 processes x 2 CPU devices, FSDP over all 4, through jax.distributed on 127.0.0.1."""
  tmp = tmp_path_factory.mktemp("multihost")
  coordinator = f"127.0.0.1:{free_port()}"
  procs = [worker("train", "--mesh=1,4,1", "--devices=2", f"--workdir={tmp / 'multi'}",
                  f"--out={tmp / 'multi.npz'}", f"--coordinator={coordinator}",
                  "--num_processes=2", f"--process_id={i}") for i in range(2)]
  single = worker("train", "--mesh=1,4,1", "--devices=4", f"--workdir={tmp / 'single'}",
                  f"--out={tmp / 'single.npz'}")
  for p in procs + [single]:
    finish(p)
  return tmp


def test_two_processes_match_one_process(two_process_run):
  multi, multi_info = load(str(two_process_run / "multi.npz"))
  single, single_info = load(str(two_process_run / "single.npz"))
  assert multi_info["steps"] == single_info["steps"] == [1, 2, 3, 4]
  # Per step, not only the parameters at the end: Adam and gradient clipping hide a uniform
  # scale of the gradient (e.g. summed instead of averaged over processes), its norm does not.
  np.testing.assert_allclose(multi_info["loss"], single_info["loss"], rtol=1e-5)
  np.testing.assert_allclose(multi_info["grad_norm"], single_info["grad_norm"], rtol=1e-4)
  assert multi_info["target_tokens"] == single_info["target_tokens"] == [GLOBAL_TARGETS] * 4
  for a, b in zip(multi, single):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert "fsdp" in "".join(multi_info["specs"])


def test_checkpoint_restores_on_another_process_count_and_mesh(two_process_run):
  out = two_process_run / "restored.npz"
  finish(worker("restore", "--mesh=1,1,2", "--devices=2",
                f"--workdir={two_process_run / 'multi'}", f"--out={out}"))
  restored, info = load(str(out))
  saved, _ = load(str(two_process_run / "multi.npz"))
  assert info["step"] == 4
  for a, b in zip(restored, saved):
    np.testing.assert_array_equal(a, b)  # resharding moves bytes, never changes them
  assert any("tensor" in s for s in info["specs"]) and not any("fsdp" in s for s in info["specs"])


def test_sampler_on_a_sharded_model_matches_one_device(eight_devices):
  r = eight_devices["sample"]  # mesh 1,2,4
  assert r["generated"] > 0 and r["tokens_equal"]
  assert r["logprob_max_diff"] < 1e-4
  assert r["sharded"] == "P('fsdp', 'tensor', None)"
  # An MoE model under the step's activation sharding (RL rollouts): experts split 4 ways.
  moe = r["moe"]
  assert moe["generated"] > 0 and moe["tokens_equal"] and moe["logprob_max_diff"] < 1e-4
  assert moe["experts"] == "P('expert', 'fsdp', None)"
