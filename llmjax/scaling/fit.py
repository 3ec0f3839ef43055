"""Fitting L(N, D) = E + A / N^alpha + B / D^beta to measured final losses.

Hoffmann et al. 2022, approach 3: with A = exp(a), B = exp(b), E = exp(e), minimize

  sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  delta = 1e-3,

with L-BFGS, started from a grid of initial values, keeping the best. The Huber loss on log
residuals makes the fit robust to a few outlying runs (a diverged or under-tuned one). The
whole grid is scored at once (numpy) and L-BFGS runs from its best points only: the paper's
full grid of ~4500 starts ends in the same minimum on data like ours, in a fraction of the time.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from llmjax.errors import ConfigError
from llmjax.scaling.laws import LossLaw

HUBER_DELTA = 1e-3

# Hoffmann et al.'s grid of initial values (their section D.2): alpha, beta in {0, 0.5, ..., 2},
# e in {-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25}.
INIT_GRID = {
    "a": np.arange(0.0, 25.1, 5.0),
    "b": np.arange(0.0, 25.1, 5.0),
    "e": np.arange(-1.0, 1.01, 0.5),
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
}
_ORDER = ("a", "b", "e", "alpha", "beta")


@dataclasses.dataclass(frozen=True)
class Fit:
  law: LossLaw
  objective: float  # the summed Huber loss at the optimum
  residuals: np.ndarray  # [runs] log L_fit - log L_measured


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
  """(Huber loss, its derivative) elementwise."""
  small = np.abs(r) <= delta
  loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))
  return loss, np.where(small, r, delta * np.sign(r))


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
  """[..., runs, 3]: the exponents of L's three terms for parameters theta [..., 5]."""
  a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
  n_term = a - alpha * log_n
  return np.stack([n_term, b - beta * log_d, np.broadcast_to(e, n_term.shape)], axis=-1)


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
  """(sum of Huber(LSE - log L), its gradient) for theta [..., 5] = (a, b, e, alpha, beta).

  log_n, log_d, log_l: [runs]. Returns shapes [...] and [..., 5].
  """
  t = _terms(theta, log_n, log_d)
  top = t.max(axis=-1, keepdims=True)
  w = np.exp(t - top)
  lse = top[..., 0] + np.log(w.sum(axis=-1))
  w = w / w.sum(axis=-1, keepdims=True)  # d LSE / d term
  loss, dr = _huber(lse - log_l, delta)
  grad = np.stack([(dr * w[..., 0]).sum(-1), (dr * w[..., 1]).sum(-1), (dr * w[..., 2]).sum(-1),
                   -(dr * w[..., 0] * log_n).sum(-1), -(dr * w[..., 1] * log_d).sum(-1)],
                  axis=-1)
  return loss.sum(axis=-1), grad


def fit_loss_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, *,
                 delta: float = HUBER_DELTA, starts: int = 64,
                 grid: dict[str, np.ndarray] | None = None) -> Fit:
  """The L(N, D) that best fits runs with `n` parameters, `d` tokens and final `loss` [runs].

  `starts`: how many of the grid's best initial values L-BFGS refines.
  """
  from scipy import optimize  # a dependency of jax itself
  n, d, loss = (np.asarray(x, dtype=np.float64).ravel() for x in (n, d, loss))
  if not (len(n) == len(d) == len(loss)):
    raise ConfigError(f"fit_loss_law: n, d and loss differ in length ({len(n)}, {len(d)}, "
                      f"{len(loss)})")
  if len(n) < 5:
    raise ConfigError(f"fitting L(N, D) needs at least 5 runs (it has 5 free parameters), got "
                      f"{len(n)}: add budgets or models to the sweep")
  if np.any(n <= 0) or np.any(d <= 0) or np.any(~np.isfinite(loss)) or np.any(loss <= 0):
    raise ConfigError("fit_loss_law: every run needs N > 0, D > 0 and a finite loss > 0")
  log_n, log_d, log_l = np.log(n), np.log(d), np.log(loss)
  grid = grid or INIT_GRID
  inits = np.array(list(itertools.product(*(grid[k] for k in _ORDER))))
  scores, _ = objective(inits, log_n, log_d, log_l, delta)
  best = None
  for theta0 in inits[np.argsort(scores)[:starts]]:
    res = optimize.minimize(lambda th: objective(th, log_n, log_d, log_l, delta), theta0,
                            jac=True, method="L-BFGS-B",
                            options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-12})
    if best is None or res.fun < best.fun:
      best = res
  a, b, e, alpha, beta = best.x
  law = LossLaw(E=float(np.exp(e)), A=float(np.exp(a)), B=float(np.exp(b)), alpha=float(alpha),
                beta=float(beta))
  t = _terms(best.x, log_n, log_d)
  top = t.max(axis=-1, keepdims=True)
  residuals = top[..., 0] + np.log(np.exp(t - top).sum(-1)) - log_l
  return Fit(law=law, objective=float(best.fun), residuals=residuals)
