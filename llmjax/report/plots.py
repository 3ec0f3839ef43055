"""The report card's figures (matplotlib, the `plot` extra): loss, RL curves, speed and time.

Each figure is drawn from the logged records alone (`llmjax.report.summary`). Without
matplotlib nothing is drawn and the report says how to get the plots.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

from llmjax.report import summary

LOSS_FILE = "loss.png"
RL_FILE = "rl.png"
SPEED_FILE = "speed.png"
NO_MATPLOTLIB = ("matplotlib is not installed, so no plots were drawn (the tables are written "
                 "all the same): pip install 'llmjax[plot]', then llmjax-report --workdir=RUN")

# The RL stages' panels: (title, [(record kind, metric), ...]); a stage draws what it logged.
RL_PANELS = (
    ("reward", [("train", "reward"), ("train", "score"), ("train", "rewards/chosen"),
                ("train", "rewards/rejected"), ("train", "rewards/margins"), ("train", "margin"),
                ("eval", "rm_score")]),
    ("KL, entropy, log-probs", [("train", "kl"), ("train", "entropy"),
                                ("train", "logps/chosen"), ("train", "logps/rejected")]),
    ("held-out accuracy", [("eval", "accuracy"), ("eval", "rewards/accuracies"),
                           ("eval", "exact_match")]),
)
_DPI = 80


def _line(steps: Sequence[int]) -> str:
  """A line, with dots where there are few points (a single point has no line to show)."""
  return ".-" if len(steps) <= 20 else "-"


def _pyplot():
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  return plt


def draw(records: Sequence[dict[str, Any]], stages: Sequence[tuple[str, str]],
         directory: str) -> list[str] | None:
  """Draws the figures into `directory`; returns their file names (the RL figure only when
  the run has an RL stage), or None when matplotlib is not installed.

  `stages`: (name, kind) of each stage, in pipeline order.
  """
  plt = _pyplot()
  if plt is None:
    return None
  files = [_loss(plt, records, stages, os.path.join(directory, LOSS_FILE))]
  rl = [(n, k) for n, k in stages if k in summary.RL_KINDS]
  if rl:
    files.append(_rl(plt, records, rl, os.path.join(directory, RL_FILE)))
  files.append(_speed(plt, records, stages, os.path.join(directory, SPEED_FILE)))
  return [os.path.basename(f) for f in files]


def _save(plt, fig, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, dpi=_DPI)
  plt.close(fig)
  return path


def _loss(plt, records, stages, path: str) -> str:
  """Train loss (line) and eval loss (dots) per stage, one panel each: the stages' objectives
  differ, so they do not share an axis."""
  fig, axes = plt.subplots(1, len(stages), figsize=(3.0 * len(stages), 2.6), squeeze=False)
  for ax, (name, kind) in zip(axes[0], stages):
    steps, values = summary.series(records, name, "train", "loss")
    ax.plot(steps, values, _line(steps), lw=1, ms=3, label="train")
    steps, values = summary.series(records, name, "eval", "loss")
    if steps:
      ax.plot(steps, values, "o", ms=4, label="eval")
    ax.set_title(f"{name} ({kind})" if name != kind else name, fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("loss", fontsize=8)
  axes[0][0].legend(fontsize=7)
  return _save(plt, fig, path)


def _rl(plt, records, stages, path: str) -> str:
  """Per RL stage, a row: rewards, KL/entropy, held-out accuracy (eval curves start at the
  stage's baseline, its start model, at step 0)."""
  fig, axes = plt.subplots(len(stages), len(RL_PANELS), figsize=(9.0, 2.4 * len(stages)),
                           squeeze=False)
  for row, (name, kind) in zip(axes, stages):
    for ax, (title, curves) in zip(row, RL_PANELS):
      drawn = 0
      for record_kind, metric in curves:
        steps, values = summary.series(records, name, record_kind, metric,
                                       with_baseline=record_kind == "eval")
        if steps:
          marker = "o-" if record_kind == "eval" else _line(steps)
          ax.plot(steps, values, marker, lw=1, ms=3,
                  label=metric + (" (eval)" if record_kind == "eval" else ""))
          drawn += 1
      ax.set_title(f"{name}: {title}", fontsize=9)
      ax.tick_params(labelsize=7)
      ax.grid(alpha=0.3)
      if drawn:
        ax.legend(fontsize=6)
      else:
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                fontsize=8, color="gray")
    row[0].set_ylabel(kind, fontsize=8)
  for ax in axes[-1]:
    ax.set_xlabel("step", fontsize=8)
  return _save(plt, fig, path)


def _speed(plt, records, stages, path: str) -> str:
  """Left: train tokens/s through the whole run (each stage's steps after the one before);
  right: wall-clock time per stage."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(9.0, 2.8))
  offset = 0
  for name, _ in stages:
    steps, values = summary.series(records, name, "train", "tokens_per_sec")
    if steps:
      left.plot([offset + s for s in steps], values, _line(steps), lw=1, ms=3, label=name)
    offset += max(summary.series(records, name, "train", "loss")[0], default=0)
  left.set_xlabel("step of the whole run", fontsize=8)
  left.set_ylabel("train tokens/s", fontsize=8)
  left.tick_params(labelsize=7)
  left.grid(alpha=0.3)
  left.legend(fontsize=7)
  names = [n for n, _ in stages]
  minutes = [(summary.summarize(records, n, k).seconds or 0.0) / 60 for n, k in stages]
  right.barh(names[::-1], minutes[::-1])
  right.set_xlabel("minutes (wall clock)", fontsize=8)
  right.tick_params(labelsize=7)
  right.grid(alpha=0.3, axis="x")
  return _save(plt, fig, path)
