"""The IsoFLOP sweep: what it plans, and that a finished run is never run again."""

import dataclasses
import json

import pytest

from llmjax import stages
from llmjax.errors import ConfigError
from llmjax.metrics import read_metrics
from llmjax.model.config import PRESETS
from llmjax.scaling import sweep

SIZE = {"d_model": 16, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "d_ff": 32}


def test_plan_gives_each_model_the_budget_in_steps():
  cfg = sweep.SweepConfig(budgets=(1e9, 1e10), models=(SIZE, {"d_model": 64}), min_steps=20)
  runs, skipped = sweep.plan_runs(cfg, PRESETS["tiny"], {"max_seq_len": 64}, 4, 32)
  small = dataclasses.replace(PRESETS["tiny"], **SIZE).num_params()
  large = dataclasses.replace(PRESETS["tiny"], d_model=64).num_params()
  assert [(r.budget, r.name, r.params) for r in runs] == [
      (1e9, "d16_l1_h2_kv2_ff32", small), (1e10, "d16_l1_h2_kv2_ff32", small),
      (1e10, "d64", large)]
  for run in runs:  # C = 6 N D, D = steps x batch x seq_len
    assert run.steps == round(run.budget / (6 * run.params * 4 * 32)) >= 20
    assert run.tokens == run.steps * 128 and run.overrides["max_seq_len"] == 64
  assert len(skipped) == 1 and "1e+09 FLOPs x d64" in skipped[0]  # 5 steps < min_steps
  with pytest.raises(ConfigError, match="SweepConfig.models is empty"):
    sweep.SweepConfig(models=())


def test_sweep_resumes_without_rerunning_finished_runs(tmp_path, tokenizer_path, monkeypatch):
  gin_file = tmp_path / "sweep.gin"
  gin_file.write_text(f"""
SweepConfig.models = [{SIZE!r}]
SweepConfig.min_steps = 1
pipeline.stages = ['pretrain']
pretrain.model = @model_config()
model_config.preset = 'tiny'
model_config.overrides = {{'max_seq_len': 32}}
pretrain.data = @DataConfig()
DataConfig.seq_len = 32
DataConfig.batch_size = 2
DataConfig.eval_batches = 1
pretrain.train = @TrainConfig()
pretrain.tokenizer = @TokenizerConfig()
TokenizerConfig.path = '{tokenizer_path}'
""")
  started = []
  real = stages.run_stages
  monkeypatch.setattr(stages, "run_stages",
                      lambda configured, ctx: started.append(ctx.workdir) or
                      real(configured, ctx))
  workdir = str(tmp_path / "sweep")
  one = sweep.run_sweep([str(gin_file)], ["SweepConfig.budgets = [3e7]"], workdir, log=print)
  assert len(started) == 1 and one[0]["steps"] == round(3e7 / (6 * one[0]["params"] * 64))
  run_dir = started[0]
  rows = [r for r in read_metrics(run_dir) if r["kind"] == "eval"]
  assert [r["step"] for r in rows] == [one[0]["steps"]]
  assert one[0]["eval_loss"] == rows[0]["loss"]
  with open(f"{run_dir}/{sweep.RESULT_FILE}") as f:
    assert json.load(f) == one[0]
  # Again, with a second budget: the finished run is read back, only the new one trains.
  two = sweep.run_sweep([str(gin_file)], ["SweepConfig.budgets = [3e7, 6e7]"], workdir,
                        log=print)
  assert len(started) == 2 and started[1] != run_dir
  assert two[0] == one[0] and two[1]["budget"] == 6e7
  assert two[1]["steps"] == 2 * one[0]["steps"]
