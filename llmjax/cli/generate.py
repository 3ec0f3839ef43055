"""`llmjax-generate`: continue prompts with the latest checkpoint of a run.

  llmjax-generate --workdir=runs/tiny --prompt="Alice has a" --prompt="3 + 4 ="
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

from llmjax.errors import LlmjaxError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable).")
flags.DEFINE_string("stage", None, "Which stage's checkpoint (default: the newest saved).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir or not FLAGS.prompt:
    raise app.UsageError("--workdir and at least one --prompt are required")
  from llmjax.checkpoint import load_run
  from llmjax.sample.simple import generate
  try:
    run = load_run(FLAGS.workdir, FLAGS.stage, FLAGS.step)
  except LlmjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  graphdef, params, tokenizer = run.graphdef, run.params, run.tokenizer
  print(f"# {run.stage} checkpoint, step {run.step}", file=sys.stderr)
  for prompt in FLAGS.prompt:
    ids = tokenizer.encode(prompt, add_bos=True)
    new = generate(graphdef, params, ids, FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                   eos_id=tokenizer.eos_id, seed=FLAGS.seed)
    print(f"{prompt}{tokenizer.decode(new)}")


def run_main():
  app.run(main)


if __name__ == "__main__":
  run_main()
