"""What a run's `metrics.jsonl` says about each stage: held-out scores, time, speed, curves.

Pure functions of the records (`llmjax.metrics.read_metrics`): nothing is recomputed, every
number in the report card is one a stage logged. A stage's records are
`{"stage", "step", "kind", ...}` with kind `train`, `eval`, `baseline` (its start model,
measured before its first step), `data` or `time` (`seconds` of one start of the stage).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any, Sequence

Record = dict[str, Any]

# Held-out scores, by column: the metric each stage kind logs for it. `accuracy` means the
# reward model's pairwise accuracy in `rm` and the greedy word-problem accuracy in `grpo`.
SCORE_METRICS: dict[str, dict[str, str]] = {
    "exact match": {"sft": "exact_match", "dpo": "exact_match", "ppo": "exact_match",
                    "distill": "exact_match"},
    "preference accuracy": {"dpo": "rewards/accuracies", "rm": "accuracy"},
    "reasoning accuracy": {"grpo": "accuracy"},
    "reward-model score": {"ppo": "rm_score"},
}
RL_KINDS = ("dpo", "rm", "ppo", "grpo")


@dataclasses.dataclass(frozen=True)
class Score:
  """A held-out score: the last evaluation's `value` (at `step`), the stage's start model's
  (`start`, from its baseline record; None when not logged) and how many items (`n`)."""
  value: float
  step: int
  start: float | None = None
  n: int | None = None


@dataclasses.dataclass(frozen=True)
class StageSummary:
  name: str
  kind: str
  steps: int | None  # the last step with a record
  seconds: float | None  # wall-clock, all starts of the stage (None: no time record)
  tokens_per_sec: float | None  # median over the train records
  train_loss: float | None  # the last train record's
  eval_loss: float | None  # the last eval record's (the stage's own objective)
  scores: dict[str, Score]


def stage_records(records: Sequence[Record], stage: str, kind: str | None = None
                  ) -> list[Record]:
  """The stage's records (of one kind), in step order."""
  rows = [r for r in records if r.get("stage") == stage and (kind is None or r["kind"] == kind)]
  return sorted(rows, key=lambda r: r["step"])


def series(records: Sequence[Record], stage: str, kind: str, metric: str,
           with_baseline: bool = False) -> tuple[list[int], list[float]]:
  """(steps, values) of `metric` in the stage's `kind` records; `with_baseline` puts the
  baseline record's value first (the start model, at step 0)."""
  rows = stage_records(records, stage, kind)
  if with_baseline:
    rows = stage_records(records, stage, "baseline") + rows
  points = [(r["step"], r[metric]) for r in rows if _number(r.get(metric))]
  return [s for s, _ in points], [float(v) for _, v in points]


def score(records: Sequence[Record], stage: str, metric: str) -> Score | None:
  """The stage's held-out `metric`: its last evaluation, with its start's when logged."""
  evals = [r for r in stage_records(records, stage, "eval") if _number(r.get(metric))]
  if not evals:
    return None
  last = evals[-1]
  starts = [r[metric] for r in stage_records(records, stage, "baseline")
            if _number(r.get(metric))]
  n = last.get(f"{metric}_n")
  return Score(float(last[metric]), last["step"], float(starts[0]) if starts else None,
               int(n) if n is not None else None)


def summarize(records: Sequence[Record], stage: str, kind: str) -> StageSummary:
  """One stage's summary from its records (`kind`: the stage's kind, e.g. 'sft')."""
  rows = stage_records(records, stage)
  train = stage_records(records, stage, "train")
  times = [r["seconds"] for r in stage_records(records, stage, "time")]
  speeds = [r["tokens_per_sec"] for r in train if _number(r.get("tokens_per_sec"))]
  losses = series(records, stage, "train", "loss")[1]
  eval_losses = series(records, stage, "eval", "loss")[1]
  scores = {}
  for column, by_kind in SCORE_METRICS.items():
    found = score(records, stage, by_kind[kind]) if kind in by_kind else None
    if found is not None:
      scores[column] = found
  return StageSummary(
      name=stage, kind=kind, steps=max((r["step"] for r in rows), default=None),
      seconds=sum(times) if times else None,
      tokens_per_sec=statistics.median(speeds) if speeds else None,
      train_loss=losses[-1] if losses else None,
      eval_loss=eval_losses[-1] if eval_losses else None, scores=scores)


def _number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v  # not NaN
