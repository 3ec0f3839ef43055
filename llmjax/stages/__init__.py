"""Stages and the pipeline that runs them in order.

A gin file lists the stages (`pipeline.stages = ['pretrain', 'sft']`); each name maps to a
gin-configurable factory here. All stages are configured before the first one runs, so a
missing or wrong value anywhere fails before any compile.

A stage kind may run more than once under other names: `'NAME/KIND'` (e.g. `'ce/sft'`) is a
`KIND` stage named `NAME`, configured in gin scope `NAME` (`ce/sft.model = ...`; its unscoped
`sft.*` bindings apply where the scope binds nothing), with its checkpoints, metrics and
model kept under `NAME` (what other stages' `init_from` / `teacher_from` name).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import gin

from llmjax.errors import ConfigError
from llmjax.model.config import check_dtype_on_backend
from llmjax.stages.context import RunContext
from llmjax.stages.distill import distill_stage
from llmjax.stages.dpo import dpo_stage
from llmjax.stages.grpo import grpo_stage
from llmjax.stages.ppo import ppo_stage
from llmjax.stages.reward_model import reward_model_stage
from llmjax.stages.pretrain import pretrain_stage
from llmjax.stages.sft import sft_stage

STAGES: dict[str, Callable[[], Any]] = {
    "pretrain": pretrain_stage,
    "sft": sft_stage,
    "rm": reward_model_stage,
    "dpo": dpo_stage,
    "grpo": grpo_stage,
    "ppo": ppo_stage,
    "distill": distill_stage,
}


def stage_entry(entry: str) -> tuple[str, str]:
  """`'sft'` -> ('sft', 'sft'); `'ce/sft'` -> ('ce', 'sft'): (the stage's name, its kind)."""
  name, _, kind = entry.rpartition("/")
  return (name or kind), kind


@gin.configurable
def pipeline(stages: Sequence[str] = ("pretrain",)) -> list[str]:
  """The stages to run, in order: kinds (`'sft'`) or named instances (`'ce/sft'`)."""
  unknown = [s for s in stages if stage_entry(s)[1] not in STAGES]
  if unknown:
    raise ConfigError(f"pipeline.stages names unknown stage(s) {unknown}; known stages are "
                      f"{sorted(STAGES)} (or 'NAME/KIND' for another instance of a KIND)")
  if not stages:
    raise ConfigError("pipeline.stages is empty: name at least one stage")
  names = [stage_entry(s)[0] for s in stages]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ConfigError(f"pipeline.stages runs {repeated} more than once under one name: give "
                      "the others names of their own ('NAME/KIND', e.g. 'ce/sft')")
  return list(stages)


def configure_stages() -> list[Any]:
  """Builds every stage of the pipeline from the parsed gin config."""
  stages = []
  for entry in pipeline():
    name, kind = stage_entry(entry)
    if name == kind:
      stage = STAGES[kind]()
    else:
      with gin.config_scope(name):
        stage = STAGES[kind]()
      # Stages are frozen dataclasses whose class attribute `name` is their kind's: this
      # instance's own name shadows it (checkpoints, metrics and outputs go by `stage.name`).
      object.__setattr__(stage, "name", name)
    _check_required(stage, stage.name)
    _check_precision(stage)
    stages.append(stage)
  return stages


def _check_precision(stage: Any) -> None:
  """float16 compute on a backend without it, or loss scaling without float16: refused here,
  before the first stage compiles anything."""
  model, train = getattr(stage, "model", None), getattr(stage, "train", None)
  if model is not None:
    check_dtype_on_backend(model)
    if train is not None:
      train.resolved_loss_scale(model.dtype)


def _check_required(obj: Any, path: str) -> None:
  # gin checks gin.REQUIRED for function parameters but hands the sentinel through to
  # dataclass fields bound via a macro (`TRAIN_FILES = %gin.REQUIRED`); catch it here.
  if obj is gin.REQUIRED:
    raise ConfigError(f"{path} is required but not set (gin.REQUIRED): bind it in the gin "
                      "file or with --gin.NAME=VALUE (see the file's 'Must override' section)")
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    for field in dataclasses.fields(obj):
      _check_required(getattr(obj, field.name), f"{path}.{field.name}")


def run_stages(stages: list[Any], ctx: RunContext) -> RunContext:
  """Runs the stages in order; each finished stage's model is kept under its name.

  Stages may differ in model shape (a teacher and its student, a reward head): each checks
  the model it starts from against its own config. Each start of a stage ends with a
  `kind: "time"` record of its wall-clock `seconds` (data, tokenizer, compiles, training,
  evals and checkpoints), at the step it reached: a stage stopped and resumed has one per
  start, and a stage that was already finished adds none.
  """
  if ctx.is_chief:
    from llmjax.runs.load import record_stages
    record_stages(ctx.workdir, [stage.name for stage in stages])
  for stage in stages:
    start = time.time()
    result = stage.run(ctx)
    _record_time(ctx, stage, result.step, time.time() - start)
    ctx.finish(stage.name, result.graphdef, result.params, stage.model, result.step)
    if not result.finished:
      ctx.stopped = (stage.name, result.step)
      break
  return ctx


def _record_time(ctx: RunContext, stage: Any, step: int, seconds: float) -> None:
  from llmjax.metrics import MetricsWriter
  writer = MetricsWriter(ctx.workdir, stage.name, stage.train.total_steps, enabled=ctx.is_chief)
  try:
    writer.write(step, {"seconds": seconds}, kind="time")
  finally:
    writer.close()
