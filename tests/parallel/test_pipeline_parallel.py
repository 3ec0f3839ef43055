"""Pipeline parallelism (llmjax/parallel/pipeline.py): pipelined == one device, resume across
stage counts, and the settings refused before anything compiles.

The 8-device cases run tests/parallel/pipeline_worker.py in fresh interpreters (the device
count is fixed when jax starts), both at once.
"""

import json
import logging
import os
import subprocess
import sys

import pytest

from llmjax.errors import ConfigError
from llmjax.parallel import mesh as mesh_lib
from llmjax.parallel.pipeline import PipelineConfig, bubble_fraction

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pipeline_worker.py")


def _start(*args):
  return subprocess.Popen([sys.executable, WORKER, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _result(proc):
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-4000:]
  return json.loads(out.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
  equal = _start("equal")
  resume = _start("resume", f"--workdir={tmp_path_factory.mktemp('pipeline')}")
  return {"equal": _result(equal), "resume": _result(resume)}


CASES = ("gpipe_stage2_data4", "gpipe_stage4_fsdp2", "gpipe_stage2_data2_tensor2",
         "circular_stage2_data4")


@pytest.mark.parametrize("case", CASES)
def test_pipelined_loss_and_gradients_match_one_device(workers, case):
  r = workers["equal"][case]
  assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
  assert r["grad_max_abs_diff"] <= 1e-5 * r["grad_max_abs"] + 1e-6
  # It did pipeline: one scan of r*m + p - 1 ticks, activations passed by collective permute.
  assert r["scan_of_ticks"] and r["collective_permutes"] > 0
  assert r["mesh"]["stage"] in (2, 4)


def test_resume_on_another_stage_count_matches_unpipelined_training(workers):
  r = workers["resume"]
  assert r["step"] == 4
  # Steps 1-2 on 2 stages, 3-4 resumed on 4 stages, each with grad accumulation 2 x 2
  # pipeline microbatches: the same losses and parameters as 4 steps without pipelining.
  assert r["loss"] == pytest.approx(r["plain_loss"], rel=1e-5)
  # AdamW's m / sqrt(v) amplifies reduction-order noise of small gradients: 6e-7 of a 0.02
  # change on one CPU (3e-5 relative), while a wrong resume or schedule moves params by ~1x.
  assert r["param_max_abs_diff"] <= 1e-4 * r["param_change"] + 1e-7
  # The bubble logged by each stage count: (p-1)/(m+p-1) with m = 2.
  assert r["bubble"] == pytest.approx([1 / 3, 1 / 3, 3 / 5, 3 / 5])
  # Stored parameters (and so optimizer state) are split over `stage` too: 4 stages x 2 data.
  assert r["q_proj_spec"] == "P('stage', None, None)"


def test_sampler_on_a_stage_mesh_matches_one_device(workers):
  r = workers["equal"]["sampler"]
  assert r["generated"] > 0 and r["tokens_equal"] and r["logprob_max_diff"] < 1e-4


def test_bubble_formula():
  # GPipe (Huang et al. 2019): p-1 idle ticks of m+p-1; circular r rounds: of r*m+p-1.
  for p, m, r in [(2, 4, 1), (4, 4, 1), (4, 16, 1), (4, 4, 2), (8, 8, 4)]:
    busy, total = r * m, r * m + p - 1
    assert bubble_fraction(p, m, r) == pytest.approx(1 - busy / total)
  assert PipelineConfig(4, 8, "circular", 2).bubble == pytest.approx(3 / 19)
  assert PipelineConfig(4, 8, "circular", 2).ticks == 19


def test_bad_pipeline_settings_are_refused_before_compiling():
  with pytest.raises(ConfigError, match="n_layers=6 does not split evenly over stage=4"):
    PipelineConfig(4, 4).check_model(6)
  with pytest.raises(ConfigError, match=r"stage \* circular_repeats = 2 \* 2 = 4"):
    PipelineConfig(2, 4, "circular", 2).check_model(6)
  with pytest.raises(ConfigError, match="num_microbatches must be at least 1"):
    mesh_lib.MeshConfig(stage=2, num_microbatches=-1)
  with pytest.raises(ConfigError, match="circular' needs num_microbatches >= stage"):
    mesh_lib.MeshConfig(stage=4, num_microbatches=2, pipeline_schedule="circular")
  with pytest.raises(ConfigError, match="pipeline_schedule='1f1b' is unknown"):
    mesh_lib.MeshConfig(stage=2, pipeline_schedule="1f1b")
  with pytest.raises(ConfigError, match="does not split into MeshConfig.num_microbatches=4"):
    PipelineConfig(2, 4).check_batch(6)
  with pytest.raises(ConfigError, match="stage=2 does not fit 3 devices"):
    mesh_lib.MeshConfig(stage=2).shape(3)
  assert mesh_lib.MeshConfig(stage=2, fsdp=2).shape(8) == (2, 2, 2, 1, 1)  # + expert
  assert mesh_lib.MeshConfig(stage=2).pipeline() == PipelineConfig(2, 2)
  assert mesh_lib.MeshConfig().pipeline() is None


def test_fewer_microbatches_than_stages_warns_with_the_bubble(caplog):
  from llmjax.train import loop
  with caplog.at_level(logging.INFO):
    loop._log_pipeline("pretrain", PipelineConfig(4, 2), grad_accum_steps=1)
  assert "expected bubble 60.0%" in caplog.text and "num_microbatches=2 is below stage=4" \
      in caplog.text and "(bubble 42.9%)" in caplog.text


def test_train_cli_refuses_layers_that_do_not_split_into_stages(tmp_path):
  from llmjax.cli.train import configure
  tiny = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "experiments", "tiny", "pretrain.gin")
  workdir = tmp_path / "run"
  # The tiny model has 2 layers: 3 stages are refused for them, before the mesh is built.
  with pytest.raises(ConfigError, match="n_layers=2 does not split evenly over stage=3"):
    configure([tiny], ["MeshConfig.stage = 3", "MeshConfig.data = 1"], str(workdir))
  assert not workdir.exists()
