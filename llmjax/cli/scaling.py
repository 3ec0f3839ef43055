"""`llmjax-scaling`: plan a run from a compute budget, or measure scaling on your data.

  llmjax-scaling plan --flops=1e21 --out=plan.gin
  llmjax-scaling plan --chip=h100 --devices=8 --hours=24 --mfu=0.4 --out=plan.gin
  llmjax-scaling sweep --workdir=runs/scaling            # experiments/tiny/scaling_sweep.gin
  llmjax-scaling sweep --workdir=runs/mine --gin_file=my_sweep.gin --gin.SweepConfig.budgets=[1e12]

`plan` prints the compute-optimal parameters and tokens (Chinchilla approach 3, 20 tokens per
parameter, Kaplan et al.) and writes an experiment file for the nearest preset. `sweep` trains
an IsoFLOP grid of small models in series (a finished run is never rerun: run it again to
resume), fits L(N, D) = E + A/N^alpha + B/D^beta to their final eval losses and writes
fit.json, sweep.md and isoflop.png in the workdir.
"""

from __future__ import annotations

import os

from absl import app, flags

from llmjax.cli import common, gin_flags
# The sweep's runs are configured as llmjax-train configures one; --workdir is its flag.
from llmjax.cli import train as train_cli

SWEEP_GIN_FILE = "experiments/tiny/scaling_sweep.gin"

FLAGS = flags.FLAGS
flags.DEFINE_float("flops", None, "plan: the training compute budget in FLOPs.")
flags.DEFINE_string("chip", None, "plan: the accelerator (h100, a100, v5p, ... as in "
                    "llmjax.metrics.PEAK_BF16_FLOPS) whose bf16 peak sets the budget.")
flags.DEFINE_float("peak_flops", None, "plan: peak FLOP/s per device, for a chip not in the "
                   "table.")
flags.DEFINE_integer("devices", 1, "plan: how many chips.")
flags.DEFINE_float("hours", None, "plan: wall-clock hours of training.")
flags.DEFINE_float("mfu", None, "plan: model FLOPs utilization you expect, e.g. 0.4.")
flags.DEFINE_integer("seq_len", 2048, "plan: sequence length of the planned run.")
flags.DEFINE_string("preset", None, "plan: use this preset rather than the nearest one.")
flags.DEFINE_string("out", None, "plan: write the experiment (gin) file here.")


def plan_main() -> None:
  from llmjax.errors import ConfigError
  from llmjax.scaling import laws, plan as plan_lib
  peak, note = FLAGS.peak_flops, ""
  if FLAGS.flops is None and FLAGS.chip is not None:
    chip, peak = laws.peak_flops_of_chip(FLAGS.chip)
    note = f" Budget: {FLAGS.devices} x {chip} ({peak:.3g} FLOP/s)"
  if FLAGS.flops is not None and (FLAGS.chip or FLAGS.hours):
    raise ConfigError("give --flops or the hardware (--chip, --devices, --hours, --mfu), "
                      "not both")
  flops = laws.compute_budget(FLAGS.flops, peak_flops=peak, devices=FLAGS.devices,
                              hours=FLAGS.hours, mfu=FLAGS.mfu)
  if note:
    note += f" for {FLAGS.hours:g} h at {100 * FLAGS.mfu:g}% MFU."
  plan = plan_lib.make_plan(flops, FLAGS.seq_len, FLAGS.preset)
  print((note.strip() + "\n" if note else "") + plan_lib.summary(plan))
  if FLAGS.out:
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    with open(FLAGS.out, "w") as f:
      f.write(plan_lib.experiment_gin(plan, note))
    print(f"\nexperiment file: {FLAGS.out}\n  llmjax-train --gin_file={FLAGS.out} "
          f"--workdir=... --gin.TRAIN_FILES=\"['...']\"")


def sweep_main() -> None:
  from llmjax.scaling import report, sweep
  workdir = train_cli.FLAGS.workdir
  if not workdir:
    raise app.UsageError("sweep needs --workdir")
  files = FLAGS.gin_file or [SWEEP_GIN_FILE]
  results = sweep.run_sweep(files, FLAGS.gin_bindings, workdir)
  report.write_report(workdir, results)


def main(argv):
  {"plan": plan_main, "sweep": sweep_main}[argv[1]]()


def run_main():
  common.run(main, argv=gin_flags.argv_with_gin_shorthand(), commands=("plan", "sweep"))


if __name__ == "__main__":
  run_main()
