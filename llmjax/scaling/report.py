"""What a sweep found: the fitted L(N, D), each budget's optimum, a table and a plot."""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from llmjax.scaling import fit as fit_lib, laws

FIT_FILE = "fit.json"
TABLE_FILE = "sweep.md"
PLOT_FILE = "isoflop.png"
NO_MATPLOTLIB = ("matplotlib is not installed, so no isoflop.png was drawn (the fit and the "
                 "table are written all the same): pip install 'llmjax[plot]'")


def fit_results(results: Sequence[dict[str, Any]], starts: int = 16) -> fit_lib.Fit:
  """L(N, D) fitted to the runs' (params, tokens, eval_loss)."""
  return fit_lib.fit_loss_law([r["params"] for r in results], [r["tokens"] for r in results],
                              [r["eval_loss"] for r in results], starts=starts)


def optima(law: laws.LossLaw, budgets: Sequence[float]) -> list[dict[str, float]]:
  """Each budget's compute-optimal (N, D, D/N, loss) under `law`."""
  rows = []
  for c in budgets:
    n, d = laws.optimal_allocation(c, law)
    rows.append({"budget": c, "params": n, "tokens": d, "tokens_per_param": d / n,
                 "loss": float(laws.chinchilla_loss(n, d, law))})
  return rows


def isoflop_minima(results: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
  """Hoffmann et al.'s approach 2: each budget's optimum from a parabola in log N through its
  best run and that run's two neighbours in N; a budget whose best run is its smallest or
  largest model has no interior minimum and is left out."""
  rows = []
  for c in sorted({r["budget"] for r in results}):
    runs = sorted((r for r in results if r["budget"] == c), key=lambda r: r["params"])
    best = min(range(len(runs)), key=lambda i: runs[i]["eval_loss"])
    if best in (0, len(runs) - 1):
      continue
    near = runs[best - 1:best + 2]
    curve = np.polyfit(np.log([r["params"] for r in near]), [r["eval_loss"] for r in near], 2)
    n = float(np.exp(-curve[1] / (2 * curve[0])))
    rows.append({"budget": c, "params": n, "tokens": c / (6 * n),
                 "tokens_per_param": c / (6 * n * n)})
  return rows


def minima_exponent(minima: Sequence[dict[str, float]]) -> float | None:
  """The slope of log N_opt on log C across budgets (approach 2's a), None below 2 budgets."""
  if len(minima) < 2:
    return None
  return float(np.polyfit(np.log([m["budget"] for m in minima]),
                          np.log([m["params"] for m in minima]), 1)[0])


def markdown(results: Sequence[dict[str, Any]], fitted: fit_lib.Fit | None) -> str:
  """The runs, the fitted law and each budget's optimum beside its best run."""
  lines = ["| budget (FLOPs) | model | N | D | D/N | steps | eval loss | time (s) |",
           "|---|---|---|---|---|---|---|---|"]
  for r in sorted(results, key=lambda r: (r["budget"], r["params"])):
    lines.append(f"| {r['budget']:.0e} | {r['model']} | {r['params']:,} | {r['tokens']:,} | "
                 f"{r['tokens'] / r['params']:.1f} | {r['steps']} | {r['eval_loss']:.4f} | "
                 f"{r['seconds']:.0f} |")
  minima = isoflop_minima(results)
  if minima:
    slope = minima_exponent(minima)
    lines += ["", "IsoFLOP minima (approach 2: parabola in log N through each budget's best run "
              "and its neighbours)" + (f": N_opt ~ C^{slope:.3f}" if slope is not None else ""),
              "", "| budget (FLOPs) | N_opt | D_opt | D/N |", "|---|---|---|---|"]
    lines += [f"| {m['budget']:.0e} | {m['params']:,.0f} | {m['tokens']:,.0f} | "
              f"{m['tokens_per_param']:.1f} |" for m in minima]
  if fitted is None:
    return "\n".join(lines) + "\n"
  law = fitted.law
  lines += ["", f"Fit: L(N, D) = {law.E:.3f} + {law.A:.4g} / N^{law.alpha:.3f} + "
            f"{law.B:.4g} / D^{law.beta:.3f}  (Huber objective {fitted.objective:.3g}, "
            f"RMS log residual {float(np.sqrt(np.mean(fitted.residuals ** 2))):.4f})",
            f"N_opt ~ C^{law.a:.3f}, D_opt ~ C^{law.b:.3f} (Chinchilla approach 3: "
            f"C^{laws.CHINCHILLA.a:.3f}, C^{laws.CHINCHILLA.b:.3f})", "",
            "| budget (FLOPs) | fitted N_opt | fitted D_opt | D/N | fitted loss | best run "
            "(loss) |", "|---|---|---|---|---|---|"]
  for row in optima(law, sorted({r["budget"] for r in results})):
    runs = [r for r in results if r["budget"] == row["budget"]]
    best = min(runs, key=lambda r: r["eval_loss"])
    lines.append(f"| {row['budget']:.0e} | {row['params']:,.0f} | {row['tokens']:,.0f} | "
                 f"{row['tokens_per_param']:.1f} | {row['loss']:.4f} | {best['model']} "
                 f"N={best['params']:,} ({best['eval_loss']:.4f}) |")
  return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], law: laws.LossLaw | None, path: str) -> bool:
  """Loss vs N per budget (points: runs; lines: the fit at 6 N D = C; stars: its optimum;
  dotted: the IsoFLOP parabola's minimum).

  Returns False, drawing nothing, when matplotlib is not installed.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(7, 4.5))
  budgets = sorted({r["budget"] for r in results})
  colors = plt.get_cmap("viridis")(np.linspace(0, 0.85, len(budgets)))
  all_n = np.array([r["params"] for r in results], dtype=float)
  grid = np.geomspace(all_n.min() / 2, all_n.max() * 2, 200)
  for c, color in zip(budgets, colors):
    runs = sorted((r for r in results if r["budget"] == c), key=lambda r: r["params"])
    ax.plot([r["params"] for r in runs], [r["eval_loss"] for r in runs], "o", color=color,
            label=f"C = {c:.0e} FLOPs")
    if law is not None:
      ax.plot(grid, laws.chinchilla_loss(grid, c / (6 * grid), law), "-", color=color, lw=1)
      n_opt, d_opt = laws.optimal_allocation(c, law)
      ax.plot([n_opt], [laws.chinchilla_loss(n_opt, d_opt, law)], "*", color=color, ms=14,
              markeredgecolor="black")
  for m in isoflop_minima(results):
    color = colors[budgets.index(m["budget"])]
    ax.axvline(m["params"], color=color, ls=":", lw=1)
  ax.set_xscale("log")
  ax.set_xlabel("parameters N (embeddings included)")
  ax.set_ylabel("final eval loss (nats/token)")
  title = "IsoFLOP sweep"
  if law is not None:
    title += (f": fit N_opt ~ C^{law.a:.2f}, D_opt ~ C^{law.b:.2f} "
              f"(alpha {law.alpha:.2f}, beta {law.beta:.2f})")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return True


def write_report(workdir: str, results: Sequence[dict[str, Any]], log=print) -> dict[str, Any]:
  """Fits the runs, writes fit.json, sweep.md and isoflop.png in `workdir`; returns the fit
  as written (None for the law when there are too few runs to fit)."""
  fitted = fit_results(results) if len(results) >= 5 else None
  if fitted is None:
    log(f"{len(results)} runs: at least 5 are needed to fit L(N, D); add budgets or models")
  law = fitted.law if fitted else None
  record = {"runs": list(results), "law": law.to_dict() if law else None,
            "a": law.a if law else None, "b": law.b if law else None,
            "optima": optima(law, sorted({r["budget"] for r in results})) if law else [],
            "isoflop_minima": isoflop_minima(results),
            "isoflop_minima_a": minima_exponent(isoflop_minima(results)),
            "chinchilla": laws.CHINCHILLA.to_dict()}
  with open(os.path.join(workdir, FIT_FILE), "w") as f:
    json.dump(record, f, indent=2)
  table = markdown(results, fitted)
  with open(os.path.join(workdir, TABLE_FILE), "w") as f:
    f.write(table)
  log(table)
  if plot(results, law, os.path.join(workdir, PLOT_FILE)):
    log(f"plot: {os.path.join(workdir, PLOT_FILE)}")
  else:
    log(NO_MATPLOTLIB)
  return record
