"""The robust L(N, D) fit recovers a known law from noisy synthetic IsoFLOP losses."""

import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.scaling import fit, report

# A known law, unlike Chinchilla's (N_opt ~ C^0.375 here), and an IsoFLOP grid of "runs":
# 5 budgets x 6 sizes, D = C / 6N.
TRUE = dict(E=1.2, A=1000.0, B=1000.0, alpha=0.5, beta=0.3)


def _runs(seed, noise=0.005):
  n = np.tile(np.geomspace(1e6, 1e8, 6), 5)
  c = np.repeat(np.geomspace(1e15, 1e19, 5), 6)
  d = c / (6 * n)
  # The law written out here, not through the code under test.
  loss = TRUE["E"] + TRUE["A"] / n ** TRUE["alpha"] + TRUE["B"] / d ** TRUE["beta"]
  return n, d, loss * np.exp(noise * np.random.default_rng(seed).standard_normal(n.size))


def test_objective_gradient_matches_finite_differences():
  n, d, loss = _runs(0)
  theta = np.array([6.0, 6.5, 0.1, 0.45, 0.25])
  args = (np.log(n), np.log(d), np.log(loss), 0.05)
  _, grad = fit.objective(theta, *args)
  eps = 1e-6
  numeric = [(fit.objective(theta + eps * e, *args)[0] - fit.objective(theta - eps * e, *args)[0])
             / (2 * eps) for e in np.eye(5)]
  np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)


def test_fit_recovers_known_exponents_despite_noise_and_an_outlier():
  n, d, loss = _runs(seed=1)
  loss[3] *= 1.3  # one run far off (a diverged or badly tuned run)
  robust = fit.fit_loss_law(n, d, loss, starts=4).law
  assert robust.alpha == pytest.approx(TRUE["alpha"], abs=0.03)
  assert robust.beta == pytest.approx(TRUE["beta"], abs=0.01)
  assert robust.E == pytest.approx(TRUE["E"], abs=0.05)
  assert robust.a == pytest.approx(0.375, abs=0.01)  # the compute-optimal exponents
  # Least squares (a Huber delta larger than every residual) is pulled off by the outlier.
  squares = fit.fit_loss_law(n, d, loss, starts=4, delta=10.0).law
  assert abs(squares.alpha - TRUE["alpha"]) > 2 * abs(robust.alpha - TRUE["alpha"])


def test_too_few_runs_is_an_error_that_says_what_to_do():
  with pytest.raises(ConfigError, match="at least 5 runs.*add budgets or models"):
    fit.fit_loss_law([1e6] * 4, [1e9] * 4, [3.0] * 4)


def test_report_without_enough_runs_writes_the_table_and_says_why(tmp_path):
  runs = [{"budget": 1e12, "model": "d16", "params": 20_000, "tokens": 8_000_000, "steps": 10,
           "eval_loss": 1.5, "seconds": 3.0}]
  said = []
  record = report.write_report(str(tmp_path), runs, log=said.append)
  assert record["law"] is None and "at least 5" in said[0]
  assert "| 1e+12 | d16 | 20,000 | 8,000,000 | 400.0 | 10 | 1.5000 |" in (
      tmp_path / report.TABLE_FILE).read_text()


def test_isoflop_minima_find_each_budgets_optimum():
  # Losses that are exactly a parabola in log N with its minimum at N = 1e5 * (C / 1e12)^0.5.
  runs = []
  for c in (1e12, 1e14):
    center = np.log(1e5 * (c / 1e12) ** 0.5)
    for n in np.geomspace(1e4, 1e7, 7):
      runs.append({"budget": c, "params": n, "eval_loss": 1 + (np.log(n) - center) ** 2})
  runs.append({"budget": 1e16, "params": 1e4, "eval_loss": 0.5})  # minimum at the edge: left out
  runs.append({"budget": 1e16, "params": 1e5, "eval_loss": 0.6})
  minima = report.isoflop_minima(runs)
  assert [m["budget"] for m in minima] == [1e12, 1e14]
  assert minima[0]["params"] == pytest.approx(1e5) and minima[1]["params"] == pytest.approx(1e6)
  assert minima[1]["tokens_per_param"] == pytest.approx(1e14 / 6 / 1e12)
  assert report.minima_exponent(minima) == pytest.approx(0.5)
