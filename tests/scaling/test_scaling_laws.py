"""The planner against Hoffmann et al. 2022's closed form and published numbers."""

import math

import gin
import numpy as np
import pytest

from llmjax import metrics
from llmjax.cli import gin_flags
from llmjax.cli.train import configure
from llmjax.errors import ConfigError
from llmjax.model.config import PRESETS
from llmjax.scaling import laws, plan as plan_lib

# The paper's eq. (10), typed in here rather than read from the code under test.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


@pytest.mark.parametrize("flops", [1e18, 5.76e23, 1e26])
def test_optimum_is_the_closed_form_and_the_minimum_of_the_loss(flops):
  n, d = laws.optimal_allocation(flops)
  a, b = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
  g = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
  assert n == pytest.approx(g * (flops / 6) ** a, rel=1e-12)
  assert d == pytest.approx((flops / 6) ** b / g, rel=1e-12)
  assert 6 * n * d == pytest.approx(flops, rel=1e-12)
  # Independently: the loss along the IsoFLOP line 6 N D = C, minimized on a fine grid.
  grid = np.geomspace(n / 100, n * 100, 400_001)
  loss = E + A / grid ** ALPHA + B / (flops / (6 * grid)) ** BETA
  assert grid[np.argmin(loss)] == pytest.approx(n, rel=1e-4)
  assert laws.chinchilla_loss(n, d) == pytest.approx(loss.min(), rel=1e-12)


def test_published_values():
  # Table 2, approach 3: N_opt ~ C^0.46, D_opt ~ C^0.54; the rounded alpha and beta of eq. (10)
  # give 0.452 and 0.548.
  assert laws.CHINCHILLA.a == pytest.approx(0.46, abs=0.01)
  assert laws.CHINCHILLA.b == pytest.approx(0.54, abs=0.01)
  assert laws.CHINCHILLA.a + laws.CHINCHILLA.b == pytest.approx(1.0)
  # Table 3 is ~20 tokens per parameter (20.0 to 22.4): 400M <-> 8.0B tokens at 1.92e19,
  # 1B <-> 20.2B, 67B <-> 1.5T, ...
  for n_table, flops, d_table in laws.CHINCHILLA_TABLE3:
    n, d = laws.tokens_per_param_allocation(flops)
    assert n == pytest.approx(n_table, rel=0.05) and d == pytest.approx(d_table, rel=0.08)
  # Approach 3's exponent (< 0.5) puts fewer parameters on every table-3 budget, and ever
  # more tokens per parameter as the budget grows.
  ratios = []
  for n_table, flops, _ in laws.CHINCHILLA_TABLE3:
    n, d = laws.optimal_allocation(flops)
    assert n < n_table
    ratios.append(d / n)
  assert ratios == sorted(ratios) and 20 < ratios[0] < 40 and ratios[-1] > 200


def test_kaplan_allocation():
  n, d = laws.kaplan_allocation(1e15 * 86400)  # one PF-day
  assert n == pytest.approx(1.3e9) and 6 * n * d == pytest.approx(1e15 * 86400)
  n10, _ = laws.kaplan_allocation(10 * 1e15 * 86400)
  assert n10 / n == pytest.approx(10 ** 0.73)


def test_budget_from_hardware():
  name, peak = laws.peak_flops_of_chip("h100")
  assert name == "NVIDIA H100" and peak == 989e12
  assert laws.peak_flops_of_chip("v5p")[0] == "TPU v5p"
  flops = laws.compute_budget(peak_flops=peak, devices=8, hours=24, mfu=0.4)
  assert flops == pytest.approx(8 * 24 * 3600 * 989e12 * 0.4)
  with pytest.raises(ConfigError, match="--chip='h900'.*--peak_flops"):
    laws.peak_flops_of_chip("h900")
  with pytest.raises(ConfigError, match="--mfu"):
    laws.compute_budget(peak_flops=peak, hours=1, mfu=40)
  with pytest.raises(ConfigError, match="give a compute budget"):
    laws.compute_budget()


@pytest.mark.parametrize("flops, preset", [(1e21, "llama3_1b"), (1e19, "llama_100m"),
                                           (1e15, "tiny"), (1e24, "llama3_8b")])
def test_plan_picks_the_nearest_preset_and_spends_the_budget(flops, preset):
  plan = plan_lib.make_plan(flops)
  assert plan.preset == preset
  n_opt = laws.optimal_allocation(flops)[0]
  distance = abs(math.log(PRESETS[preset].num_params() / n_opt))
  assert all(distance <= abs(math.log(cfg.num_params() / n_opt)) for cfg in PRESETS.values()
             if not cfg.n_experts)  # dense presets: the laws are fitted on dense models
  tokens_per_step = plan.batch_size * plan.seq_len
  spent = plan.steps * tokens_per_step * metrics.flops_per_token(PRESETS[preset], plan.seq_len)
  step_flops = spent / plan.steps
  assert abs(spent - flops) <= step_flops / 2 + 1  # rounded to the nearest whole step
  assert plan.batch_size & (plan.batch_size - 1) == 0  # a power of two


def _configure(text, tmp_path, musts):
  path = tmp_path / "plan.gin"
  path.write_text(text)
  gin_flags.parse_gin([str(path)], [])
  read = gin.config_str()
  assert all(f"%{k}" in read for k in musts)  # the file names what the user must give
  (stage,) = configure([str(path)], [f"{k} = {v}" for k, v in musts.items()],
                       str(tmp_path / "run"))
  return stage


def test_the_experiment_file_parses_and_names_the_preset(tmp_path):
  plan = plan_lib.make_plan(8 * 24 * 3600 * 989e12 * 0.4)  # 8 H100 for 24 h at 40% MFU
  stage = _configure(plan_lib.experiment_gin(plan, "8 x H100 for 24 h"), tmp_path,
                     {"TRAIN_FILES": "['/data/*.jsonl']", "TOKENIZER": "'/data/tok.json'"})
  assert plan.preset == "llama3_1b"
  assert stage.model.d_model == PRESETS["llama3_1b"].d_model
  assert stage.model.num_params() == PRESETS["llama3_1b"].num_params()
  assert stage.model.dtype == "bfloat16"
  assert stage.train.total_steps == plan.steps
  assert stage.data.batch_size == plan.batch_size and stage.data.seq_len == plan.seq_len
  assert stage.optimizer.learning_rate == plan.learning_rate
  assert stage.optimizer.warmup_steps == plan.warmup_steps < plan.steps


def test_the_tiny_experiment_file_trains_its_own_tokenizer(tmp_path):
  plan = plan_lib.make_plan(1e15)
  stage = _configure(plan_lib.experiment_gin(plan), tmp_path, {"TRAIN_FILES": "['/d.jsonl']"})
  assert stage.model == PRESETS["tiny"] and stage.tokenizer.path is None


def test_cli_plan_writes_the_experiment_file(tmp_path):
  import subprocess
  import sys
  out = tmp_path / "plan.gin"
  proc = subprocess.run([sys.executable, "-m", "llmjax.cli.scaling", "plan", "--chip=h100",
                         "--devices=8", "--hours=24", "--mfu=0.4", f"--out={out}"],
                        capture_output=True, text=True, cwd=gin_flags.REPO_ROOT)
  assert proc.returncode == 0, proc.stderr
  assert "2.73e+20 FLOPs" in proc.stdout and "preset 'llama3_1b'" in proc.stdout
  assert "model_config.preset = 'llama3_1b'" in out.read_text()
  proc = subprocess.run([sys.executable, "-m", "llmjax.cli.scaling", "plan", "--chip=h900",
                         "--hours=1", "--mfu=0.4"], capture_output=True, text=True,
                        cwd=gin_flags.REPO_ROOT)
  assert proc.returncode == 2 and "error: --chip='h900'" in proc.stderr
