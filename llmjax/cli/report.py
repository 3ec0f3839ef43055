"""`llmjax-report`: a run's report card, `<workdir>/report/report.md` with its plots.

  llmjax-report --workdir=runs/tiny_full
  llmjax-report --workdir=runs/tiny_full --prompt="Where does Alice live?" --prompt="2 + 2?"

`llmjax-train` writes it at the end of every run of more than one stage; this writes it again
(e.g. after installing matplotlib for the plots: pip install 'llmjax[plot]'), or for a run
that stopped early. The stages' settings come from the run's config.gin; every score and
curve from its metrics.jsonl; the answers from its checkpoints.
"""

from __future__ import annotations

import os

from absl import app, flags

from llmjax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_multi_string("prompt", [], "Prompts every stage answers (repeatable; default: "
                          "built-in held-out questions and word problems, with references).")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens each greedy answer may have.")


def configured_stages(workdir: str) -> list:
  """The run's stages as its config.gin (the latest start's operative config) builds them."""
  from llmjax.cli import gin_flags
  from llmjax.errors import ConfigError
  from llmjax import stages
  path = os.path.join(workdir, "config.gin")
  if not os.path.exists(path):
    raise ConfigError(f"{workdir} has no config.gin: is it an llmjax-train workdir?")
  gin_flags.parse_gin([path], [])
  return stages.configure_stages()


def main(argv):
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  from llmjax.report import answers, write_report
  prompts = [answers.Prompt(p) for p in FLAGS.prompt] or None
  write_report(FLAGS.workdir, configured_stages(FLAGS.workdir), prompts, FLAGS.max_new_tokens)


def run_main():
  common.run(main)


if __name__ == "__main__":
  run_main()
