"""IsoFLOP sweep: at each compute budget C, train a ladder of small models on C FLOPs each.

A model with N parameters gets D = C / (6 N) tokens, i.e. steps = D / (batch * seq_len)
(rounded; the run's real D is what the fit uses). Every run is an ordinary `pretrain` stage
of the sweep's gin file in its own workdir (`<workdir>/runs/<budget>_<model>/`), with the
model's overrides, its step count and a learning-rate schedule as long as the run (Hoffmann
et al.: a cosine longer than the run overstates the loss of short runs). A run that finished
leaves `result.json` and is never rerun; one that was interrupted resumes from its last
checkpoint. The runs' final eval losses are then fitted with L(N, D) (`fit.py`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Sequence

import gin
from absl import logging

from llmjax.errors import ConfigError

RESULT_FILE = "result.json"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """What the sweep trains: `budgets` (training FLOPs, C = 6 N D) x `models`.

  `models`: model_config overrides of the gin file's model, one dict per size, e.g.
  `{'d_model': 64, 'n_layers': 2, 'n_heads': 2, 'n_kv_heads': 2, 'd_ff': 192}`.
  A (budget, model) pair with fewer than `min_steps` steps is left out (warmup would be all
  of it); `warmup_fraction` of each run's steps warm the learning rate up.
  """
  budgets: tuple[float, ...] = (1e12, 3e12, 1e13)
  models: tuple[dict[str, Any], ...] = ()
  min_steps: int = 50
  warmup_fraction: float = 0.1
  checkpoints_per_run: int = 4

  def __post_init__(self):
    object.__setattr__(self, "budgets", tuple(float(b) for b in self.budgets))
    object.__setattr__(self, "models", tuple(dict(m) for m in self.models))
    if not self.budgets or any(not b > 0 for b in self.budgets):
      raise ConfigError(f"SweepConfig.budgets must be positive FLOP counts, got {self.budgets}")
    if not self.models:
      raise ConfigError("SweepConfig.models is empty: give model_config overrides for each "
                        "size, e.g. [{'d_model': 64, 'n_layers': 2}, ...]")
    if not 0 <= self.warmup_fraction < 1:
      raise ConfigError(f"SweepConfig.warmup_fraction must be in [0, 1), got "
                        f"{self.warmup_fraction}")


@dataclasses.dataclass(frozen=True)
class PlannedRun:
  budget: float
  name: str  # the model's name in the sweep, from its shape
  overrides: dict[str, Any]  # model_config.overrides of this run (the file's and the size's)
  params: int  # N: every parameter, embeddings included (Hoffmann et al.'s count)
  steps: int
  tokens: int  # D = steps * batch * seq_len

  @property
  def key(self) -> str:
    return f"{self.budget:.0e}_{self.name}".replace("+", "")


def model_name(overrides: dict[str, Any]) -> str:
  """A short name for a size from its shape fields: 'd64_l2_ff192'."""
  short = {"d_model": "d", "n_layers": "l", "n_heads": "h", "n_kv_heads": "kv", "d_ff": "ff",
           "head_dim": "hd", "vocab_size": "v"}
  return "_".join(f"{short.get(k, k)}{v}" for k, v in overrides.items()
                  if not isinstance(v, (dict, str, bool)) and v is not None) or "base"


def plan_runs(cfg: SweepConfig, base_model: Any, base_overrides: dict[str, Any],
              batch_size: int, seq_len: int) -> tuple[list[PlannedRun], list[str]]:
  """(the runs, a note for each (budget, model) left out for having too few steps)."""
  import dataclasses as dc
  runs, skipped = [], []
  tokens_per_step = batch_size * seq_len
  for budget in cfg.budgets:
    for size in cfg.models:
      model = dc.replace(base_model, **size)
      n = model.num_params()
      steps = round(budget / (6.0 * n * tokens_per_step))
      name = model_name(size)
      if steps < cfg.min_steps:
        skipped.append(f"{budget:.0e} FLOPs x {name} (N={n:,}): {steps} steps < "
                       f"SweepConfig.min_steps={cfg.min_steps}")
        continue
      runs.append(PlannedRun(budget, name, {**base_overrides, **size}, n, steps,
                             steps * tokens_per_step))
  return runs, skipped


def _run_bindings(run: PlannedRun, cfg: SweepConfig, tokenizer_path: str) -> list[str]:
  every = max(run.steps // cfg.checkpoints_per_run, 1)
  return [f"model_config.overrides = {run.overrides!r}",
          f"TrainConfig.total_steps = {run.steps}",
          f"TrainConfig.eval_every = {run.steps}",
          f"TrainConfig.checkpoint_every = {every}",
          "TrainConfig.keep_checkpoints = 1",
          f"TrainConfig.log_every = {max(run.steps // 10, 1)}",
          f"OptimizerConfig.warmup_steps = {int(cfg.warmup_fraction * run.steps)}",
          f"TokenizerConfig.path = {tokenizer_path!r}"]


def read_result(run_dir: str) -> dict[str, Any] | None:
  path = os.path.join(run_dir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def final_eval_loss(run_dir: str, step: int) -> float:
  """The eval loss a run's pretrain stage recorded at `step` (its last step)."""
  from llmjax.metrics import read_metrics
  rows = [r for r in read_metrics(run_dir)
          if r.get("stage") == "pretrain" and r["kind"] == "eval" and r["step"] == step]
  if not rows:
    raise ConfigError(f"{run_dir}: no eval loss at step {step} in metrics.jsonl")
  return float(rows[-1]["loss"])


def _base(gin_files: Sequence[str],
          bindings: Sequence[str]) -> tuple[Any, SweepConfig, dict[str, Any]]:
  """The sweep file's pretrain stage (model, data, ...), its SweepConfig, and the file's own
  model_config.overrides (each size's are laid over them)."""
  from llmjax import stages
  from llmjax.cli import gin_flags
  gin_flags.parse_gin(gin_files, bindings)
  configured = stages.configure_stages()
  if [s.name for s in configured] != ["pretrain"]:
    raise ConfigError(f"a sweep's gin file runs one pretrain stage (pipeline.stages = "
                      f"['pretrain']), got {[s.name for s in configured]}")
  try:
    overrides = dict(gin.query_parameter("model_config.overrides") or {})
  except ValueError:  # not bound in the file
    overrides = {}
  return configured[0], SweepConfig(), overrides


def _tokenizer(stage: Any, workdir: str) -> str:
  """The tokenizer every run shares: the file's TokenizerConfig.path, or one trained once on
  the training documents and kept as `<workdir>/tokenizer.model`."""
  if stage.tokenizer.path:
    return stage.tokenizer.path
  from llmjax.data import pipeline
  from llmjax.stages.context import TOKENIZER_FILE, RunContext
  path = os.path.join(workdir, TOKENIZER_FILE)
  if not os.path.exists(path):
    train_docs, _ = pipeline.document_sources(stage.data)
    RunContext(workdir=workdir).ensure_tokenizer(stage.tokenizer, train_docs, stage.model)
  return path


def run_sweep(gin_files: Sequence[str], bindings: Sequence[str], workdir: str,
              log=print) -> list[dict[str, Any]]:
  """Runs every planned run not yet finished, in series; returns every run's result.

  A result: {budget, model, overrides, params, steps, tokens, eval_loss, seconds}.
  """
  from llmjax import stages
  from llmjax.cli.train import configure
  base, cfg, base_overrides = _base(gin_files, bindings)
  runs, skipped = plan_runs(cfg, base.model, base_overrides, base.data.batch_size,
                            base.data.seq_len)
  for note in skipped:
    log(f"left out: {note}")
  if not runs:
    raise ConfigError("the sweep has no run with at least SweepConfig.min_steps steps: raise "
                      "the budgets or use smaller models")
  os.makedirs(workdir, exist_ok=True)
  tokenizer_path = _tokenizer(base, workdir)
  results = []
  for i, run in enumerate(runs):
    run_dir = os.path.join(workdir, "runs", run.key)
    done = read_result(run_dir)
    if done is not None and done["steps"] == run.steps and done["params"] == run.params:
      log(f"[{i + 1}/{len(runs)}] {run.key}: finished before (eval loss "
          f"{done['eval_loss']:.4f}), not rerun")
      results.append(done)
      continue
    log(f"[{i + 1}/{len(runs)}] {run.key}: N={run.params:,} D={run.tokens:,} "
        f"({run.steps} steps)")
    start = time.time()
    configured = configure(gin_files, [*bindings, *_run_bindings(run, cfg, tokenizer_path)],
                           run_dir, ["llmjax-scaling", "sweep", *gin_files, *bindings])
    ctx = stages.run_stages(configured, stages.RunContext(workdir=run_dir))
    if ctx.stopped:  # a stop request (SIGTERM): the next start resumes this run
      log(f"stopped during {run.key}; run the sweep again to resume")
      break
    result = {"budget": run.budget, "model": run.name, "overrides": run.overrides,
              "params": run.params, "steps": run.steps, "tokens": run.tokens,
              "eval_loss": final_eval_loss(run_dir, run.steps),
              "seconds": round(time.time() - start, 1)}
    with open(os.path.join(run_dir, RESULT_FILE + ".tmp"), "w") as f:
      json.dump(result, f, indent=2)
    os.replace(os.path.join(run_dir, RESULT_FILE + ".tmp"), os.path.join(run_dir, RESULT_FILE))
    logging.info("%s: eval loss %.4f in %.0f s", run.key, result["eval_loss"],
                 result["seconds"])
    results.append(result)
  return results


def budget_label(flops: float) -> str:
  exponent = math.floor(math.log10(flops))
  return f"{flops / 10 ** exponent:g}e{exponent}"
