"""The DPO, reward-model, GRPO and distill steps sharded over 8 simulated devices with 2
microbatches equal one device in one batch: pairs stay whole across microbatches and
devices. DPO, GRPO and distill run with chunked log-probs (the vocab split over `tensor`)."""

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mesh_worker.py")


@pytest.fixture(scope="module")
def results(tokenizer_path):
  proc = subprocess.run([sys.executable, WORKER, tokenizer_path], capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("stage", ["dpo", "rm"])
def test_sharded_accumulated_step_equals_one_device(results, stage):
  assert results["pairs"] >= 12  # several pairs per row: packing is exercised
  r = results[stage]
  got, ref = r["metrics"], r["ref_metrics"]
  # The pair count is exact: a pair split across microbatches or devices would be counted
  # in both halves or lose its chosen/rejected partner.
  assert got["target_tokens"] == ref["target_tokens"] == results["pairs"]
  for key in ("loss", "grad_norm"):
    assert got[key] == pytest.approx(ref[key], rel=1e-5), key
  accuracy = "rewards/accuracies" if stage == "dpo" else "accuracy"
  assert got[accuracy] == ref[accuracy]
  margins = "rewards/margins" if stage == "dpo" else "margin"
  assert got[margins] == pytest.approx(ref[margins], rel=1e-4, abs=1e-6)
  assert abs(ref[margins]) > 1e-4  # the reference / the two rewards really differ
  # One SGD step: the parameters moved by the gradient, the same on both (float32 sums in
  # another order agree far below the step itself).
  assert r["param_max_diff"] < 1e-4 * r["param_max_change"]


def test_sharded_accumulated_grpo_step_equals_one_device(results):
  r = results["grpo"]
  got, ref = r["metrics"], r["ref_metrics"]
  # dapo's weight is the step's completion-token count, exact across microbatches.
  assert got["target_tokens"] == ref["target_tokens"] > 16
  for key in ("loss", "grad_norm", "kl", "entropy", "advantage_abs"):
    assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
  assert ref["grad_norm"] > 0 and ref["kl"] > 0  # the reference differs from the policy
  assert r["param_max_diff"] < 1e-4 * r["param_max_change"]


def test_sharded_ppo_rollout_and_step_equal_one_device(results):
  scoring = results["ppo_scoring"]
  # Values, advantages (GAE, then whitened over the whole batch) and returns: the same
  # numbers on 8 devices, whichever device holds which rows.
  for key in ("old_logps", "old_values", "advantages", "returns"):
    assert scoring[key] < 1e-5, key
  for key in ("score", "kl", "explained_variance", "value_mean"):
    assert scoring["metrics"][key] == pytest.approx(scoring["ref_metrics"][key], rel=1e-5,
                                                    abs=1e-6), key
  assert scoring["ref_metrics"]["kl"] > 0
  r = results["ppo"]
  got, ref = r["metrics"], r["ref_metrics"]
  for key in ("loss", "grad_norm", "value_loss", "policy_loss", "approxkl"):
    assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), key
  assert r["param_max_diff"] < 1e-4 * r["param_max_change"]


def test_sharded_accumulated_distill_step_equals_one_device(results):
  r = results["distill"]
  got, ref = r["metrics"], r["ref_metrics"]
  assert got["target_tokens"] == ref["target_tokens"] > 0
  for key in ("loss", "grad_norm", "jsd", "ce", "teacher_ce"):
    assert got[key] == pytest.approx(ref[key], rel=1e-5), key
  assert ref["jsd"] > 0 and ref["grad_norm"] > 0
  assert r["param_max_diff"] < 1e-4 * r["param_max_change"]
