"""Crash harness: SIGKILL a training stage (and its export) at random moments, restart the
same command each time, and check that nothing was lost or corrupted.

For each stage (pretrain, sft, dpo, grpo; the tiny model, tens of steps) it runs the stage's
`llmjax-train` command once without interruption (the reference) and `llmjax-export` on it,
then runs the same commands in a fresh workdir, killing them with SIGKILL:

  random  at a random time after the start (mostly start-up: imports, restore, compile)
  steps   after a random number of this start's training steps, no checkpoint save in flight
  save    while a checkpoint save is in flight (Orbax's `<step>.orbax-checkpoint-tmp`): an
          async one, or with --saves=sync a synchronous one (training paused until it is done)
  delete  while the oldest checkpoint is being deleted (a save committed a 4th one; 3 are kept)
  export  while `llmjax-export` writes its temporary folder beside --output

and restarting the same command after every kill. The phase recorded for a kill is what the
harness saw at the instant of the kill (a 'steps' kill that caught a save is a 'save' kill).
Checked:

  - every restart resumed from the last complete checkpoint on disk (the loop logs
    "Resumed <stage> from step N"; no line: from scratch, when there was none)
  - every checkpoint left on disk restores (params, train state, data iterator state, meta)
  - steps lost (steps done at the kill - step resumed from) are at most checkpoint_every,
    plus the steps run while an unfinished async save was in flight (see `Kill.bound`); with
    synchronous saves (--saves=sync: TrainConfig.async_checkpoints=False) at most
    checkpoint_every, and no step ran while a save was unfinished
  - a killed export leaves no folder at --output, or a complete one (killed after its rename)
  - the finished run's parameters, optimizer state, RNG and data-iterator state equal the
    reference's bit for bit, so do its per-step losses, and its export is byte-identical
    (the reference always saves asynchronously, the default: so the save mode changes no
    number either)

  python bench/chaos.py --stages=pretrain,sft,dpo,grpo --kills=25 --seed=0 \
      --workdir=/tmp/chaos [--saves=sync]

prints one row per kill, a table per stage and a markdown summary (bench/RESULTS.md).
tests/test_chaos.py runs `run_stage` with 3 kills of pretrain (two during saves: an async
one, a synchronous one).
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = [sys.executable, "-m", "llmjax.cli.train"]
EXPORT = [sys.executable, "-m", "llmjax.cli.export"]
TINY_MODEL = "--gin.model_config.overrides={'d_model': 64, 'd_ff': 128, 'n_heads': 4, " \
             "'n_kv_heads': 2}"
# Small shards: the export writes several files, renamed into place at the end (the step a
# kill must never leave half-done behind a name that looks finished).
EXPORT_SHARD = "64KB"
POLL_S = 0.001
PHASES = ("random", "steps", "save", "delete", "export")
# Shares of the planned kills; a remainder goes to the phases in this order.
PHASE_SHARES = {"save": 0.24, "steps": 0.24, "export": 0.2, "delete": 0.16, "random": 0.16}
KEEP = 3  # TrainConfig.keep_checkpoints: a 4th committed step means the oldest is deleted
# How the killed starts save (TrainConfig.async_checkpoints): 'alternate' switches after each
# kill, async first (so every kill's run is resumed with the other setting).
SAVES = ("async", "sync", "alternate")

RESUMED = re.compile(r"Resumed (\S+) from step (\d+)")
PROGRESS = re.compile(r"^\[(\S+)\] \|[#.]*\| (\d+)/(\d+)")


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage's chaos run: its experiment file and the bindings that make it tiny."""
  name: str
  gin_file: str
  bindings: tuple[str, ...]  # beyond the tiny model, steps and checkpoint interval
  scope: str  # gin scope of its TrainConfig ('' for the unscoped one)
  start: str | None  # the base run's stage it starts from (None: a random init)

  def command(self, workdir: str, steps: int, every: int, base: str | None,
              sync_saves: bool = False) -> list[str]:
    train = f"{self.scope}/TrainConfig" if self.scope else "TrainConfig"
    args = [f"--workdir={workdir}", f"--gin_file=experiments/tiny/{self.gin_file}",
            TINY_MODEL, f"--gin.{train}.total_steps={steps}",
            f"--gin.{train}.checkpoint_every={every}", f"--gin.{train}.log_every=1",
            f"--gin.{train}.eval_every={steps}", *self.bindings]
    if sync_saves:
      args.append(f"--gin.{train}.async_checkpoints=False")
    if self.start:
      args.append(f"--gin.{self.name}.init_from='{base}:{self.start}'")
    return TRAIN + args


STAGES = {
    "pretrain": StageSpec("pretrain", "pretrain.gin", (
        "--gin.SEQ_LEN=64", "--gin.BATCH_SIZE=4", "--gin.DataConfig.eval_batches=1",
        "--gin.OptimizerConfig.warmup_steps=5", "--gin.TokenizerConfig.train_documents=2000"),
        scope="", start=None),
    "sft": StageSpec("sft", "sft.gin", (
        "--gin.SFTDataConfig.seq_len=64", "--gin.SFTDataConfig.batch_size=4",
        "--gin.SFTDataConfig.eval_batches=1", "--gin.sft.eval_questions=0",
        "--gin.OptimizerConfig.warmup_steps=5"), scope="", start="pretrain"),
    "dpo": StageSpec("dpo", "dpo.gin", (
        "--gin.pipeline.stages=['dpo']", "--gin.PreferenceDataConfig.seq_len=128",
        "--gin.PreferenceDataConfig.batch_size=4",
        "--gin.PreferenceDataConfig.max_pairs_per_row=2",
        "--gin.PreferenceDataConfig.builtin_train=64",
        "--gin.PreferenceDataConfig.builtin_eval=8",
        "--gin.PreferenceDataConfig.eval_batches=1", "--gin.dpo.eval_questions=0",
        "--gin.dpo/OptimizerConfig.warmup_steps=2"), scope="dpo", start="sft"),
    "grpo": StageSpec("grpo", "grpo.gin", (
        "--gin.pipeline.stages=['grpo']", "--gin.NUM_GENERATIONS=4",
        "--gin.PROMPTS_PER_STEP=2", "--gin.GRPOConfig.max_new_tokens=8",
        "--gin.PromptDataConfig.builtin_train=32", "--gin.PromptDataConfig.builtin_eval=4",
        "--gin.PromptDataConfig.eval_prompts=4", "--gin.grpo/OptimizerConfig.warmup_steps=2"),
        scope="grpo", start="sft"),
}


def base_command(workdir: str) -> list[str]:
  """The run sft, dpo and grpo start from: 20 pretrain and 10 SFT steps of the tiny model."""
  return TRAIN + [
      f"--workdir={workdir}", "--gin_file=experiments/tiny/pipeline.gin", TINY_MODEL,
      "--gin.SEQ_LEN=64", "--gin.BATCH_SIZE=4", "--gin.TOTAL_STEPS=20",
      "--gin.TrainConfig.checkpoint_every=20", "--gin.DataConfig.eval_batches=1",
      "--gin.TokenizerConfig.train_documents=2000", "--gin.SFT_STEPS=10",
      "--gin.sft/TrainConfig.checkpoint_every=10", "--gin.SFTDataConfig.seq_len=64",
      "--gin.SFTDataConfig.batch_size=4", "--gin.SFTDataConfig.eval_batches=1",
      "--gin.sft.eval_questions=0"]


def export_command(workdir: str, output: str) -> list[str]:
  # --overwrite: the same command again after a kill that came after the folder's rename.
  return EXPORT + [f"--workdir={workdir}", f"--output={output}",
                   f"--max_shard_size={EXPORT_SHARD}", "--overwrite"]


def shown(cmd: list[str]) -> str:
  """The command as a user types it (console-script names, quoted gin values)."""
  names = {"llmjax.cli.train": "llmjax-train", "llmjax.cli.export": "llmjax-export"}
  words = [names[cmd[2]]] + cmd[3:]
  return " ".join(w if re.fullmatch(r"[\w./=:,+-]+", w) else f'"{w}"' for w in words)


# ---- What is on disk ----

def checkpoint_steps(ckpt_dir: str) -> tuple[list[int], list[int]]:
  """(committed steps, steps with a save in flight) in a stage's checkpoint folder."""
  try:
    names = os.listdir(ckpt_dir)
  except FileNotFoundError:
    return [], []
  done = sorted(int(n) for n in names if n.isdigit())
  tmp = sorted(int(n.split(".")[0]) for n in names
               if ".orbax-checkpoint-tmp" in n and n.split(".")[0].isdigit())
  return done, tmp


def trash(ckpt_dir: str) -> list[str]:
  """Old steps being deleted (llmjax.checkpoint.TRASH)."""
  try:
    return os.listdir(os.path.join(ckpt_dir, ".deleted"))
  except FileNotFoundError:
    return []


def export_temporaries(output: str, moved_aside: bool = False) -> list[str]:
  """What `llmjax.hf.export.atomic_output_dir` writes beside `output` before its rename
  (with `moved_aside`, also the replaced folder it moves aside under --overwrite)."""
  parent, name = os.path.split(os.path.abspath(output))
  kinds = ("tmp", "old") if moved_aside else ("tmp",)
  return [p for kind in kinds for p in glob.glob(os.path.join(parent, f".{name}.{kind}-*"))]


def _manager(ckpt_dir: str):
  import orbax.checkpoint as ocp
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # a read-only manager warns that it is one
  try:
    return ocp.CheckpointManager(
        ckpt_dir, options=ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                       save_interval_steps=0),
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
  finally:
    logging.set_verbosity(level)


def read_checkpoint(ckpt_dir: str, step: int) -> dict[str, Any]:
  """Every item of one checkpoint: params, train state (numpy), meta, the data state files.

  Raises if any of them cannot be read: that checkpoint is unusable.
  """
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  items = dict(params=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
  if os.path.isdir(os.path.join(ckpt_dir, str(step), "train")):
    items["train"] = ocp.args.StandardRestore()
  manager = _manager(ckpt_dir)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  finally:
    manager.close()
  out = {k: jax.tree.map(np.asarray, restored[k]) for k in items if k != "meta"}
  out["meta"] = restored["meta"]
  data_dir = os.path.join(ckpt_dir, str(step), "data")
  out["data"] = {}
  if "train" in items:  # a resumable checkpoint has its data position
    for name in sorted(os.listdir(data_dir)):
      if name != "commit_success.txt":
        with open(os.path.join(data_dir, name), "rb") as f:
          text = f.read()
        try:  # a grain iterator's state is JSON, a BatchSource's base64 (grain's handler)
          json.loads(text)
        except ValueError:
          base64.b64decode(text, validate=True)
        out["data"][name] = text
    if not out["data"]:
      raise ValueError(f"{data_dir} holds no iterator state")
  return out


def unusable_checkpoints(ckpt_dir: str) -> dict[int, str]:
  """{step: error} for each committed checkpoint that does not restore completely."""
  bad = {}
  for step in checkpoint_steps(ckpt_dir)[0]:
    try:
      read_checkpoint(ckpt_dir, step)
    except Exception as e:  # pylint: disable=broad-except
      bad[step] = f"{type(e).__name__}: {str(e)[:200]}"
  return bad


def differences(a: Any, b: Any, path: str = "") -> list[str]:
  """Where two restored checkpoints (nested dicts of arrays) differ, bit for bit."""
  import numpy as np
  if isinstance(a, dict) and isinstance(b, dict):
    if set(a) != set(b):
      return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
    return [d for k in sorted(a) for d in differences(a[k], b[k], f"{path}/{k}")]
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    if len(a) != len(b):
      return [f"{path}: lengths {len(a)} vs {len(b)}"]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}/{i}")]
  if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
    a, b = np.asarray(a), np.asarray(b)
    # Bytes, not values: NaN == NaN and -0.0 != 0.0 here.
    same = a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    return [] if same else [path]
  return [] if a == b else [path]


def folder_differences(a: str, b: str) -> list[str]:
  """Files that differ (or exist in one only) between two export folders."""
  names_a, names_b = set(os.listdir(a)), set(os.listdir(b))
  diff = sorted(names_a ^ names_b)
  for name in sorted(names_a & names_b):
    with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
      if fa.read() != fb.read():
        diff.append(name)
  return diff


def train_losses(workdir: str, stage: str) -> dict[int, float]:
  """{step: loss} of the stage's train records; raises on a repeated step or a bad line."""
  losses: dict[int, float] = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      if r["stage"] == stage and r["kind"] == "train":
        if r["step"] in losses:
          raise ValueError(f"step {r['step']} logged twice in {workdir}/metrics.jsonl")
        losses[r["step"]] = r["loss"]
  return losses


# ---- One process, watched and maybe killed ----

class Watched:
  """A started command, its log read as it grows, and its workdir's checkpoint folder."""

  def __init__(self, cmd: list[str], log: str, ckpt_dir: str | None = None,
               export_to: str | None = None, total_steps: int | None = None):
    self.log, self.ckpt_dir, self.export_to = log, ckpt_dir, export_to
    self.total_steps = total_steps
    # Left by a killed export before this one: this process deletes them, never writes them.
    self._abandoned = set(export_temporaries(export_to)) if export_to else set()
    self._log_file = open(log, "w")
    self.start = time.time()
    self.proc = subprocess.Popen(cmd, stdout=self._log_file, stderr=subprocess.STDOUT,
                                 cwd=ROOT, start_new_session=True)
    self._offset, self._partial = 0, ""
    self.resumed: int | None = None  # the step this start restored (0: none)
    self.steps_here = 0  # train steps this start has logged
    self.step = None  # the last step this start logged
    self.first_step_s = self.last_step_s = None  # when they were seen (s after the start)

  def elapsed(self) -> float:
    return time.time() - self.start

  def read_log(self) -> None:
    with open(self.log, errors="replace") as f:
      f.seek(self._offset)
      text = f.read()
      self._offset = f.tell()
    lines = (self._partial + text).split("\n")
    self._partial = lines.pop()
    for line in lines:
      if (m := RESUMED.search(line)) and self.resumed is None:
        self.resumed = int(m.group(2))
      elif m := PROGRESS.match(line):
        if self.resumed is None:
          self.resumed = 0  # training began with no "Resumed" line: a fresh start
        self.steps_here += 1
        self.step = int(m.group(2))
        self.first_step_s = self.first_step_s or self.elapsed()
        self.last_step_s = self.elapsed()

  def saving(self) -> list[int]:
    return checkpoint_steps(self.ckpt_dir)[1] if self.ckpt_dir else []

  def deleting(self) -> bool:
    """An old checkpoint is being deleted: one too many committed, or in the trash."""
    return bool(self.ckpt_dir) and (len(checkpoint_steps(self.ckpt_dir)[0]) > KEEP
                                    or bool(trash(self.ckpt_dir)))

  def exporting(self) -> bool:
    return bool(self.export_to and set(export_temporaries(self.export_to)) - self._abandoned)

  def phase(self) -> str:
    """What this process is doing now, as far as the files show."""
    if self.export_to:
      return "export" if self.exporting() else "export-other"
    if self.saving() and self.steps_here:
      return "save"
    if self.deleting() and self.steps_here:
      return "delete"
    if self.steps_here and self.step == self.total_steps:
      return "final"  # the last step done: final eval, save and exit
    return "steps" if self.steps_here else "startup"

  def finished(self) -> bool:
    return self.proc.poll() is not None

  def kill(self) -> str:
    """SIGKILL now; returns the phase seen just before."""
    self.read_log()
    phase = self.phase()
    os.killpg(self.proc.pid, signal.SIGKILL)
    self.proc.wait()
    self._log_file.close()
    self.read_log()
    return phase

  def wait(self) -> int:
    rc = self.proc.wait()
    self._log_file.close()
    self.read_log()
    return rc

  def tail(self, n: int = 3000) -> str:
    with open(self.log, errors="replace") as f:
      return f.read()[-n:]


@dataclasses.dataclass(frozen=True)
class Timing:
  """The reference run's timeline: start-up, the training steps, the end (eval, save, exit)."""
  startup_s: float
  steps_s: float
  tail_s: float

  def estimate(self, steps_left: float) -> float:
    """Seconds a start with `steps_left` of the run's steps (a fraction) should take."""
    return self.startup_s + steps_left * self.steps_s + self.tail_s


def kill_trigger(phase: str, rng: random.Random, every: int, total: int,
                 est_s: float = 0.0) -> Callable[[Watched], bool]:
  """A predicate, polled every millisecond, that says when to kill the process; `est_s`:
  how long the process should run if not killed."""
  if phase == "random":
    at = rng.uniform(0.0, est_s)
    return lambda w: w.elapsed() >= at
  if phase == "steps":
    state: dict[str, Any] = {}

    def steps(w: Watched) -> bool:
      if not w.steps_here:
        return False
      if "k" not in state:  # first step of this start: pick how many steps it may run
        room = total - (w.resumed or 0) - 1
        state["k"] = rng.randint(1, max(1, min(2 * every, room)))
      return w.steps_here >= state["k"] and not w.saving()
    return steps
  if phase == "save":
    return _held_for(lambda w: w.steps_here and w.saving(), rng.uniform(0.0, 0.1))
  if phase == "delete":
    return _held_for(lambda w: w.steps_here and w.deleting(), rng.uniform(0.0, 0.02))
  if phase == "export":
    return _held_for(lambda w: w.exporting(), rng.uniform(0.0, 0.05))
  raise ValueError(f"unknown phase {phase!r}; choose from {PHASES}")


def _held_for(condition: Callable[[Watched], bool], delay_s: float) -> Callable[[Watched], bool]:
  """A trigger that fires once `condition` has held for `delay_s` (a random point inside a
  window that opens and closes, e.g. a save in flight)."""
  since: list[float | None] = [None]

  def trigger(w: Watched) -> bool:
    if not condition(w):
      since[0] = None
      return False
    since[0] = since[0] or time.time()
    return time.time() - since[0] >= delay_s
  return trigger


def run_until(w: Watched, trigger: Callable[[Watched], bool] | None) -> str | None:
  """Polls `w` until `trigger` says kill (returns the phase) or it exits (returns None)."""
  while True:
    if w.finished():
      return None
    w.read_log()
    if trigger is not None and trigger(w):
      return w.kill()
    time.sleep(POLL_S)


# ---- Kills and their checks ----

@dataclasses.dataclass
class Kill:
  stage: str
  round: int
  planned: str
  phase: str  # seen at the kill: startup / steps / save / export / export-other
  at_s: float  # seconds after the process started
  step: int | None = None  # the last step the killed start completed (train kills)
  in_flight: int | None = None  # the step whose save was in flight at the kill
  last_complete: int | None = None  # newest committed checkpoint after the kill (0: none)
  sync_saves: bool = False  # the killed start saved synchronously
  resumed: int | None = None  # what the next start restored
  unusable: dict[int, str] = dataclasses.field(default_factory=dict)
  # Export kills: what is at --output after it: 'none', 'previous' (the complete folder an
  # earlier export left, untouched), 'complete' (killed after the rename) or 'INCOMPLETE'.
  export_left: str | None = None
  every: int = 0

  @property
  def lost(self) -> int | None:
    if self.resumed is None or self.step is None:
      return None
    return max(self.step, self.last_complete or 0) - self.resumed

  @property
  def bound(self) -> int | None:
    """The most steps this kill may lose: checkpoint_every, plus the steps run since the
    save in flight began (an async save not yet committed leaves the one before it); with
    synchronous saves, checkpoint_every."""
    if self.step is None:
      return None
    if self.sync_saves or not self.in_flight:
      return self.every
    return self.every + max(0, self.step - self.in_flight)

  @property
  def problems(self) -> list[str]:
    p = [f"unusable checkpoint {s}: {e}" for s, e in self.unusable.items()]
    if self.step is not None and self.resumed is not None:
      if self.resumed != (self.last_complete or 0):
        p.append(f"resumed from {self.resumed}, last complete checkpoint {self.last_complete}")
      if self.lost > self.bound:
        p.append(f"lost {self.lost} steps > {self.bound}")
      if self.sync_saves and self.in_flight is not None and self.step > self.in_flight:
        p.append(f"step {self.step} ran before the synchronous save of {self.in_flight} ended")
    if self.export_left == "INCOMPLETE":
      p.append("an incomplete export at --output")
    return p

  def row(self) -> str:
    fmt = lambda v: "-" if v is None else str(v)
    saves = "-" if self.planned == "export" else "sync" if self.sync_saves else "async"
    return (f"| {self.stage} | {self.round} | {saves} | {self.planned} | {self.phase} | "
            f"{self.at_s:.2f} | {fmt(self.step)} | {fmt(self.in_flight)} | "
            f"{fmt(self.last_complete)} | {fmt(self.resumed)} | {fmt(self.lost)} | "
            f"{len(self.unusable)} | {fmt(self.export_left)} | "
            f"{'; '.join(self.problems) or 'ok'} |")


KILL_HEADER = ("| stage | round | saves | planned | phase | at s | step | save in flight | "
               "last complete | resumed | lost | unusable | export left | result |\n"
               "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


@dataclasses.dataclass
class StageResult:
  stage: str
  saves: str  # one of SAVES
  command: str
  export: str
  every: int
  steps: int
  kills: list[Kill]
  rounds: int
  bit_equal: list[bool]  # per round: final checkpoint == the reference's
  losses_equal: list[bool]
  export_equal: list[bool]
  leftovers: list[str]  # temporaries left behind after the runs finished
  errors: list[str]
  wall_s: float

  @property
  def corrupt(self) -> int:
    return sum(len(k.unusable) + (k.export_left == "INCOMPLETE") for k in self.kills)

  @property
  def over_bound(self) -> int:
    return sum(1 for k in self.kills if k.lost is not None and k.lost > k.bound)

  @property
  def over_every(self) -> int:
    return sum(1 for k in self.kills if k.lost is not None and k.lost > self.every)

  @property
  def wrong_resume(self) -> int:
    return sum(1 for k in self.kills if k.resumed is not None and k.step is not None
               and k.resumed != (k.last_complete or 0))

  @property
  def ok(self) -> bool:
    return (not self.errors and self.corrupt == 0 and self.over_bound == 0
            and self.wrong_resume == 0 and all(self.bit_equal) and all(self.losses_equal)
            and all(self.export_equal) and bool(self.bit_equal))


def plan(kills: int, rng: random.Random) -> list[str]:
  """`kills` phases in PHASE_SHARES proportions, shuffled."""
  counts = {p: int(kills * s) for p, s in PHASE_SHARES.items()}
  for p in PHASE_SHARES:
    if sum(counts.values()) == kills:
      break
    counts[p] += 1
  phases = [p for p, n in counts.items() for _ in range(n)]
  rng.shuffle(phases)
  return phases


def log(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def ensure_base(workdir: str) -> str:
  """The pretrain + SFT run that sft, dpo and grpo start from (built once, uninterrupted)."""
  base = os.path.join(workdir, "base")
  if not os.path.exists(os.path.join(base, "checkpoints", "sft", "10")):
    shutil.rmtree(base, ignore_errors=True)
    log(f"base run: {shown(base_command(base))}")
    os.makedirs(workdir, exist_ok=True)
    w = Watched(base_command(base), os.path.join(workdir, "base.log"))
    if w.wait():
      raise RuntimeError(f"the base run failed:\n{w.tail()}")
  return base


class _StageChaos:
  """One stage: the reference run, then rounds of killed and restarted runs (`run_stage`)."""

  def __init__(self, spec: StageSpec, workdir: str, kills: int, seed: int, steps: int,
               every: int, base: str | None, saves: str = "async",
               phases: list[str] | None = None):
    if saves not in SAVES:
      raise ValueError(f"unknown saves {saves!r}; choose from {SAVES}")
    self.spec, self.workdir, self.steps, self.every, self.base = spec, workdir, steps, every, base
    self.saves = saves
    self.rng = random.Random(seed)
    # Phases still to kill in.
    self.todo = list(phases) if phases is not None else plan(kills, self.rng)
    self.kills = len(self.todo)
    command = spec.command("RUN", steps, every, base, sync_saves=saves == "sync")
    self.result = StageResult(spec.name, saves, shown(command),
                              shown(export_command("RUN", "RUN_export")), every, steps, [], 0,
                              [], [], [], [], [], 0.0)
    self.started = 0  # processes, numbering their logs

  def start(self, cmd: list[str], name: str, **watch: Any) -> Watched:
    self.started += 1
    log_file = os.path.join(self.workdir, "logs", f"{self.started:03d}_{name}.log")
    return Watched(cmd, log_file, **watch)

  def fail(self, what: str, w: Watched) -> None:
    self.result.errors.append(f"{what} failed (exit {w.proc.returncode}):\n{w.tail()}")

  def reference(self) -> None:
    """The uninterrupted run, its export and timeline: what every round must reproduce."""
    self.ref = os.path.join(self.workdir, "reference")
    self.ref_export = os.path.join(self.workdir, "reference_export")
    w = self.start(self.spec.command(self.ref, self.steps, self.every, self.base), "reference")
    run_until(w, None)
    if w.wait():
      raise RuntimeError(f"the reference run failed:\n{w.tail()}")
    self.timing = Timing(w.first_step_s, w.last_step_s - w.first_step_s,
                         w.elapsed() - w.last_step_s)
    from llmjax.hf.export import export_run  # what llmjax-export runs, in this process
    export_run(self.ref, self.ref_export, max_shard_size=EXPORT_SHARD)
    self.ref_final = read_checkpoint(os.path.join(self.ref, "checkpoints", self.spec.name),
                                     self.steps)
    self.ref_losses = train_losses(self.ref, self.spec.name)
    log(f"{self.spec.name}: reference {w.elapsed():.1f} s ({self.timing}), "
        f"{len(self.ref_losses)} steps")

  def train(self, r: int, run: str) -> bool:
    """Starts the stage in `run` until a start is not killed: each start takes the next
    planned training kill. False if a start failed."""
    ckpt_dir = os.path.join(run, "checkpoints", self.spec.name)
    pending: list[Kill] = []  # kills whose restart has not yet shown where it resumed
    while True:
      # Alternating by kills made, not by starts: a start that misses its planned kill (it
      # ran to the end) leaves the next start, maybe in the next round, on the same mode.
      sync = self.saves == "sync" or (self.saves == "alternate"
                                      and len(self.result.kills) % 2 == 1)
      cmd = self.spec.command(run, self.steps, self.every, self.base, sync_saves=sync)
      planned = next((p for p in self.todo if p != "export"), None)
      w = self.start(cmd, f"round{r}_train", ckpt_dir=ckpt_dir, total_steps=self.steps)
      done = checkpoint_steps(ckpt_dir)[0]
      est_s = self.timing.estimate(1 - (max(done) if done else 0) / self.steps)
      trigger = (kill_trigger(planned, self.rng, self.every, self.steps, est_s) if planned
                 else None)
      phase = run_until(w, trigger)
      if w.resumed is not None:
        for k in pending:
          k.resumed = w.resumed
        pending = []
      if phase is None:  # ran to the end (a planned kill not reached stays planned)
        if w.wait():
          self.fail(f"round {r}: a restart", w)
          return False
        for k in pending:
          k.resumed = w.resumed
        return True
      self.todo.remove(planned)
      done, in_flight = checkpoint_steps(ckpt_dir)
      kill = Kill(self.spec.name, r, planned, phase, w.elapsed(),
                  step=w.step or (w.resumed or 0),
                  in_flight=max(in_flight) if in_flight else None,
                  last_complete=max(done) if done else 0, sync_saves=sync,
                  unusable=unusable_checkpoints(ckpt_dir), every=self.every)
      if kill.in_flight is not None and not w.steps_here:
        kill.in_flight = None  # a leftover of an earlier kill (a start cleans them up first)
      elif kill.in_flight is not None:
        kill.phase = "save"  # one began between the look and the kill
      if w.resumed is None:  # killed before it restored: its predecessor's step stands
        kill.step = kill.last_complete
      self.result.kills.append(kill)
      pending.append(kill)
      log(kill.row())

  def check(self, r: int, run: str) -> None:
    """The finished run against the reference: final checkpoint, losses, what is left."""
    res = self.result
    ckpt_dir = os.path.join(run, "checkpoints", self.spec.name)
    leftover = checkpoint_steps(ckpt_dir)[1]
    if leftover or trash(ckpt_dir):
      res.leftovers.append(f"round {r}: checkpoint temporaries {leftover}, being deleted "
                           f"{trash(ckpt_dir)}")
    final = read_checkpoint(ckpt_dir, self.steps)
    items = ("params", "train", "data")
    diff = differences({k: final[k] for k in items}, {k: self.ref_final[k] for k in items})
    res.bit_equal.append(not diff)
    if diff:
      res.errors.append(f"round {r}: final checkpoint differs from the reference at {diff[:5]}")
    losses = train_losses(run, self.spec.name)
    res.losses_equal.append(losses == self.ref_losses)
    if losses != self.ref_losses:
      bad = sorted(s for s in set(losses) | set(self.ref_losses)
                   if losses.get(s) != self.ref_losses.get(s))
      res.errors.append(f"round {r}: train losses differ from the reference at steps "
                        f"{bad[:10]}")

  def export(self, r: int, run: str) -> None:
    """Export kills (one per round while training kills remain, else all that remain), then
    the export run to the end and compared with the reference's."""
    out = run + "_export"
    exports = self.todo.count("export")
    quota = exports if len(self.todo) == exports else min(1, exports)
    for _ in range(5 * self.kills):  # an export that finishes before its kill is redone
      if not quota:
        break
      existed = os.path.exists(out)
      w = self.start(export_command(run, out), f"round{r}_export", export_to=out)
      phase = run_until(w, kill_trigger("export", self.rng, self.every, self.steps))
      if phase is None:
        if w.wait():
          return self.fail(f"round {r}: export", w)
        continue
      self.todo.remove("export")
      quota -= 1
      left = "none"
      if os.path.exists(out):
        left = "INCOMPLETE" if folder_differences(out, self.ref_export) else (
            "previous" if existed else "complete")
      kill = Kill(self.spec.name, r, "export", phase, w.elapsed(), export_left=left,
                  every=self.every)
      self.result.kills.append(kill)
      log(kill.row())
    w = self.start(export_command(run, out), f"round{r}_export")
    if w.wait():
      return self.fail(f"round {r}: export", w)
    diff = folder_differences(out, self.ref_export)
    self.result.export_equal.append(not diff)
    if diff:
      self.result.errors.append(f"round {r}: export differs from the reference's in {diff}")
    temporaries = export_temporaries(out, moved_aside=True)
    if temporaries:
      self.result.leftovers.append(f"round {r}: export temporaries {temporaries}")


def run_stage(spec: StageSpec, workdir: str, kills: int, seed: int, steps: int, every: int,
              base: str | None = None, saves: str = "async",
              phases: list[str] | None = None) -> StageResult:
  """The reference run and export, then `kills` kills of the same commands in rounds (a
  fresh workdir each, trained to the end and exported); see the module doc for what is
  checked. `workdir` is this stage's own folder; what is in it is deleted first.

  `saves`: how the killed starts save (SAVES; the reference saves asynchronously).
  `phases`: the kills to make, in this order, instead of `kills` planned at random.
  """
  t0 = time.time()
  shutil.rmtree(workdir, ignore_errors=True)
  os.makedirs(os.path.join(workdir, "logs"))
  chaos = _StageChaos(spec, workdir, kills, seed, steps, every, base, saves, phases)
  chaos.reference()
  res = chaos.result
  while chaos.todo and not res.errors:
    if res.rounds == chaos.kills + 2:  # each round but the last should take a kill at least
      res.errors.append(f"kills not made after {res.rounds} rounds: {chaos.todo}")
      break
    res.rounds += 1
    run = os.path.join(workdir, f"round{res.rounds}")
    if chaos.train(res.rounds, run):
      chaos.check(res.rounds, run)
      chaos.export(res.rounds, run)
  res.wall_s = time.time() - t0
  return res


def summary_table(results: list[StageResult]) -> str:
  """One row per stage: kills by the phase they hit, then what the checks found."""
  phases = ("startup", "steps", "save", "delete", "final", "export", "export-other")
  lines = ["| stage | saves | kills | " + " | ".join(phases) + " | corrupt checkpoints or exports | "
           "wrong resume step | lost > checkpoint_every | lost > bound | max lost (every) | "
           "bit-equal to uninterrupted | rounds | wall |",
           "|---" * (len(phases) + 12) + "|"]
  for res in results:
    lost = [k.lost for k in res.kills if k.lost is not None]
    same = all(res.bit_equal) and all(res.losses_equal) and all(res.export_equal)
    counts = " | ".join(str(sum(1 for k in res.kills if k.phase == p)) for p in phases)
    lines.append(
        f"| {res.stage} | {res.saves} | {len(res.kills)} | {counts} | {res.corrupt} | {res.wrong_resume} | "
        f"{res.over_every} | {res.over_bound} | {max(lost, default=0)} ({res.every}) | "
        f"{'yes' if same and res.bit_equal else 'NO'} | {res.rounds} | "
        f"{res.wall_s / 60:.1f} min |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--stages", default="pretrain,sft,dpo,grpo")
  parser.add_argument("--kills", type=int, default=25, help="kills per stage")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=60, help="total steps of each run")
  parser.add_argument("--every", type=int, default=10, help="checkpoint_every")
  parser.add_argument("--saves", choices=SAVES, default="async",
                      help="how the killed runs save: async (the default TrainConfig), sync "
                      "(TrainConfig.async_checkpoints=False: a kill loses at most --every "
                      "steps), alternate (switching at each kill)")
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.workdir, "xla-cache"))
  stages = args.stages.split(",")
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    parser.error(f"unknown stages {unknown}; choose from {sorted(STAGES)}")
  base = ensure_base(args.workdir) if any(STAGES[s].start for s in stages) else None
  print(KILL_HEADER, flush=True)
  results = []
  for i, name in enumerate(stages):
    res = run_stage(STAGES[name], os.path.join(args.workdir, name), args.kills,
                    args.seed + i, args.steps, args.every, base, args.saves)
    results.append(res)
    for k in res.kills:
      print(k.row(), flush=True)
    for e in res.errors + res.leftovers:
      print(f"{name}: {e}", flush=True)
  print()
  print(summary_table(results))
  print()
  for res in results:
    print(f"{res.stage}: `{res.command}`, then `{res.export}`")
  return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
