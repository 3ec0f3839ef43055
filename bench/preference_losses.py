"""Every preference loss of the dpo stage, one short run each on the tiny pipeline: no NaN,
and what each does to the held-out pairs and questions in that budget.

  llmjax-train --gin_file=experiments/tiny/pipeline.gin --workdir=runs/tiny_chat  # the SFT start
  python bench/preference_losses.py --init_from=runs/tiny_chat --steps=60

Prints one markdown row per loss type (final train loss, held-out implicit-reward accuracy,
exact match and rejected match of greedy answers, the start's exact match for comparison).
"""

from __future__ import annotations

import math
import os
import tempfile

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("init_from", None, "An SFT run (workdir) to start every run from.",
                    required=True)
flags.DEFINE_integer("steps", 60, "Steps per loss type.")
flags.DEFINE_float("learning_rate", 1e-4, "Learning rate of every run.")
flags.DEFINE_list("loss_types", None, "Only these (default: every type the stage offers).")

# Settings a type needs beyond the defaults (beta 0.1, no smoothing).
EXTRA = {"exo_pair": {"label_smoothing": 1e-3}, "simpo": {"beta": 2.0, "simpo_gamma": 1.0},
         "orpo": {"beta": 0.1}}


def run_one(loss_type, workdir: str) -> dict:
  from llmjax.data import preferences
  from llmjax.metrics import read_metrics
  from llmjax.runs.load import load_run
  from llmjax.stages import RunContext, run_stages
  from llmjax.stages.context import TokenizerConfig
  from llmjax.stages.dpo import PreferenceLoss, dpo_stage
  from llmjax.train import loop
  from llmjax.train.optimizer import OptimizerConfig

  start = load_run(FLAGS.init_from)
  name = "+".join(loss_type) if isinstance(loss_type, tuple) else loss_type
  stage = dpo_stage(
      model=start.model_cfg,
      data=preferences.PreferenceDataConfig(seq_len=256, batch_size=8, max_pairs_per_row=4,
                                            eval_batches=16),
      train=loop.TrainConfig(total_steps=FLAGS.steps, log_every=10, eval_every=FLAGS.steps,
                             checkpoint_every=FLAGS.steps),
      optimizer=OptimizerConfig(learning_rate=FLAGS.learning_rate, warmup_steps=5,
                                weight_decay=0.0),
      tokenizer=TokenizerConfig(), loss=PreferenceLoss(loss_type=loss_type,
                                                       **EXTRA.get(name, {})),
      init_from=FLAGS.init_from, eval_questions=100)
  run_stages([stage], RunContext(workdir=workdir))
  records = read_metrics(workdir)
  train = [r for r in records if r["kind"] == "train"]
  ev = [r for r in records if r["kind"] == "eval"][-1]
  base = [r for r in records if r["kind"] == "baseline"][-1]
  finite = all(math.isfinite(r["loss"]) for r in train)
  return {"name": name, "loss": train[-1]["loss"], "finite": finite,
          "accuracy": ev["rewards/accuracies"], "exact": ev["exact_match"],
          "rejected": ev["rejected_match"], "start_exact": base["exact_match"]}


def main(argv):
  del argv
  from llmjax.stages.dpo import STAGE_LOSS_TYPES
  types = FLAGS.loss_types or list(STAGE_LOSS_TYPES) + [("sigmoid", "sft")]
  print("| loss_type | final train loss | all finite | held-out reward accuracy | "
        "exact match (start) | rejected match |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for i, t in enumerate(types):
      r = run_one(tuple(t.split("+")) if isinstance(t, str) and "+" in t else t,
                  os.path.join(tmp, str(i)))
      print(f"| {r['name']} | {r['loss']:.4f} | {r['finite']} | {r['accuracy']:.3f} | "
            f"{r['exact']:.3f} ({r['start_exact']:.3f}) | {r['rejected']:.3f} |", flush=True)


if __name__ == "__main__":
  app.run(main)
