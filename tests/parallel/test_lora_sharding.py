"""A LoRA and a QLoRA train step sharded over 8 simulated devices equal one device."""

import json
import os
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lora_worker.py")


@pytest.fixture(scope="module")
def results():
  proc = subprocess.run([sys.executable, WORKER], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", ["lora", "qlora"])
def test_sharded_lora_step_equals_one_device(results, variant):
  r = results[variant]
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
  # grad_norm sees a uniform gradient scale that Adam's update would hide.
  assert r["grad_norm"] == pytest.approx(r["ref_grad_norm"], rel=1e-5)
  # Adam's first update moves each adapter entry by ~lr; agreement far below that.
  assert r["param_max_diff"] < 1e-5 * max(r["param_max_change"], 1.0)
  # The frozen base (float or quantized codes and scales) is sharded, not replicated.
  assert any("fsdp" in s for s in r["frozen_specs"])
  assert any("tensor" in s for s in r["frozen_specs"])
