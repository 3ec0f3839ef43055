"""`llmjax-train`: run the stages an experiment file chooses.

  llmjax-train --workdir=runs/tiny                          # the built-in tiny experiment
  llmjax-train --gin_file=experiments/llama3_1b/pretrain.gin --workdir=/data/run1 \
      --gin.TrainConfig.total_steps=2000 --gin_bindings="DataConfig.seq_len = 4096"
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from typing import Sequence

import gin
from absl import app, flags, logging

from llmjax.cli import common, gin_flags
from llmjax.errors import ConfigError, LlmjaxError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Run directory: config, checkpoints, metrics, tokenizer.")
flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for a multi-process run started by hand; Cloud TPU "
                    "slices and SLURM jobs are detected without it.")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_bool("jax_distributed", False,
                  "Call jax.distributed.initialize() with cluster auto-detection (every worker "
                  "of a Cloud TPU slice; launch/tpu_vm.py sets it).")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer("stop_after_steps", None,
                     "Checkpoint and stop once a stage reaches this step, as a preemption "
                     "would; running again resumes.")


def configure(gin_files: list[str], gin_bindings: list[str], workdir: str,
              command: Sequence[str] | None = None):
  """Parses gin and builds every stage, then records the config in the workdir.

  Nothing is written, and the workdir is not created, unless every stage and `MeshConfig()`
  (against this run's devices) built without error and every stage that already has
  checkpoints in the workdir is the model and tokenizer they hold: a bad override must not
  touch an existing run. Returns the stages.
  """
  import jax
  from llmjax import stages
  from llmjax.model import moe
  from llmjax.parallel import mesh as mesh_lib
  gin_flags.parse_gin(gin_files, gin_bindings)
  try:
    configured = stages.configure_stages()
    mesh_cfg = mesh_lib.MeshConfig()
    pipeline = mesh_cfg.pipeline()
    for stage in configured:
      if getattr(stage, "model", None) is not None:
        # experts that do not split over the mesh, layers that do not split into stages
        moe.check_parallelism(stage.model, mesh_cfg.expert, mesh_cfg.stage)
        if pipeline is not None:
          pipeline.check_model(stage.model.n_layers)
    mesh_cfg.shape(jax.device_count())  # a mesh that cannot be built fails here
  except RuntimeError as e:  # gin raises RuntimeError for a missing gin.REQUIRED value
    if "Required bindings" in str(e) or "gin.REQUIRED" in str(e):
      raise ConfigError(f"gin config: {e}. Bind it in the gin file or with "
                        "--gin.NAME=VALUE.") from None
    raise
  for stage in configured:
    check_resumable(workdir, stage)
  if jax.process_index() == 0:
    write_config(workdir, configured, command)
  return configured


def check_resumable(workdir: str, stage) -> None:
  """CheckpointError/ConfigError when `stage`'s checkpoints in `workdir` hold another model,
  or were trained with another tokenizer than the `TokenizerConfig.path` it is given.

  The train loop checks the model again on resume; here it fails before config.gin is
  rewritten, so a wrong --workdir is left exactly as it was.
  """
  from llmjax.checkpoint import Checkpointer, check_same_model
  from llmjax.data.hf_tokenizer import load_tokenizer
  from llmjax.data.tokenizer import same_vocabulary
  from llmjax.runs.load import has_checkpoint
  model = getattr(stage, "model", None)
  if model is None or not has_checkpoint(workdir, stage.name):
    return
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints", stage.name), every=1)
  try:
    step = ckpt.latest_step()
    meta = ckpt.read_meta(step) if step is not None else None
  finally:
    ckpt.close()
  if meta is None:
    return
  check_same_model(meta["model"], model, ckpt.directory)
  given = getattr(getattr(stage, "tokenizer", None), "path", None)
  recorded = os.path.join(workdir, meta.get("tokenizer") or "")
  if given and meta.get("tokenizer") and os.path.isfile(recorded) and not same_vocabulary(
      load_tokenizer(given), load_tokenizer(recorded)):
    raise ConfigError(f"TokenizerConfig.path={given!r} is not the tokenizer {ckpt.directory} "
                      f"was trained with ({recorded}; their vocabularies differ): resume "
                      "with that one, or use a new --workdir")


CONFIG_FILE = "config.gin"
HISTORY_DIR = "config_history"


def write_config(workdir: str, configured: list, command: Sequence[str] | None = None) -> str:
  """Writes the config this start runs with; returns the history file's path.

  `config.gin` is the latest start's, and `config_history/NNNN.gin` keeps every start's (a
  resumed run may have been started with other overrides). Each holds gin's operative config
  (every value the stages were built with, defaults included), then, as comments, the command
  and what gin does not show: each stage's resolved model (preset plus overrides).
  """
  lines = [f"# llmjax-train start at {time.strftime('%Y-%m-%d %H:%M:%S')}"]
  if command:
    lines.append("# command: " + " ".join(shlex.quote(a) for a in command))
  text = "\n".join(lines) + "\n\n" + gin.operative_config_str() + "\n"
  text += "# ---- Resolved (not gin bindings: what the stages were built with) ----\n"
  for stage in configured:
    text += f"# {stage.name}.model = {stage.model!r}\n"
  history = os.path.join(workdir, HISTORY_DIR)
  os.makedirs(history, exist_ok=True)
  numbers = [int(n[:-4]) for n in os.listdir(history) if n.endswith(".gin") and n[:-4].isdigit()]
  path = os.path.join(history, f"{max(numbers, default=0) + 1:04d}.gin")
  for target in (path, os.path.join(workdir, CONFIG_FILE)):
    with open(target + ".tmp", "w") as f:  # never a half-written config.gin
      f.write(text)
    os.replace(target + ".tmp", target)
  return path


def run_or_clean_up(configured: list, ctx, created: bool) -> None:
  """Runs the stages; if this start created the workdir and fails on bad input (a missing
  file, a malformed line) before any checkpoint exists, removes the workdir again, so a
  failed first start leaves nothing that looks like a run."""
  from llmjax import stages
  from llmjax.runs.load import has_checkpoint, saved_stages
  try:
    stages.run_stages(configured, ctx)
  except LlmjaxError:
    saved = any(has_checkpoint(ctx.workdir, s) for s in saved_stages(ctx.workdir))
    if created and ctx.is_chief and not saved:
      shutil.rmtree(ctx.workdir, ignore_errors=True)
    raise


def main(argv):
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from llmjax import stages
  from llmjax.parallel import distributed, mesh as mesh_lib
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         auto=FLAGS.jax_distributed)
  created = not os.path.exists(FLAGS.workdir)
  configured = configure(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.workdir,
                         ["llmjax-train", *sys.argv[1:]])  # as typed, --gin.X=Y included
  mesh_cfg = mesh_lib.MeshConfig()  # after configure: gin has parsed the files
  mesh = mesh_lib.make_mesh(mesh_cfg)
  names = [s.name for s in configured]
  logging.info("Running stages %s in %s on mesh %s", names, FLAGS.workdir, dict(mesh.shape))
  ctx = stages.RunContext(workdir=FLAGS.workdir, stop_after=FLAGS.stop_after_steps,
                          mesh=mesh, rules=mesh_cfg.rules, pipeline=mesh_cfg.pipeline())
  run_or_clean_up(configured, ctx, created)
  if ctx.stopped:
    stage, step = ctx.stopped
    print(f"stopped: {stage} saved at step {step} in {os.path.abspath(FLAGS.workdir)}; run the "
          "same command again to resume", file=sys.stderr)
  else:
    print(f"done: results in {os.path.abspath(FLAGS.workdir)}", file=sys.stderr)
    if len(configured) > 1:
      write_report(FLAGS.workdir, configured)


def write_report(workdir: str, configured: list) -> None:
  """The report card of a run of several stages (`llmjax-report` writes it again). It loads
  each stage's checkpoint on one process: a multi-process run leaves it to llmjax-report."""
  import jax
  if jax.process_count() > 1:
    if jax.process_index() == 0:
      print(f"report: run llmjax-report --workdir={workdir} (one process) for the report card",
            file=sys.stderr)
    return
  from llmjax.report import write_report as write
  write(workdir, configured, log=lambda text: print(text, file=sys.stderr))


def run_main():
  common.run(main, argv=gin_flags.argv_with_gin_shorthand())


if __name__ == "__main__":
  run_main()
