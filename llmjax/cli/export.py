"""`llmjax-export`: write a run's checkpoint as a Hugging Face model folder.

  llmjax-export --workdir=runs/tiny --output=exports/tiny [--stage=sft] [--step=1000] \
      [--dtype=bfloat16] [--max_shard_size=2GB]
  llmjax-export --workdir=runs/lora --output=exports/lora-adapter --adapter_only
  llmjax-export --workdir=runs/rm --output=exports/rm --task=reward

The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer`; a reward
model (head 'score') exports as *ForSequenceClassification (num_labels=1), for
`AutoModelForSequenceClassification`. A LoRA or
QLoRA run exports merged (W + s A B, a QLoRA base dequantized first: exactly the weights
the trained model computes with); `--adapter_only` writes its adapters alone as a PEFT folder
for `peft.PeftModel.from_pretrained(base, dir)`.
"""

from __future__ import annotations

from absl import app, flags

from llmjax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's (or an llmjax-import's) directory.")
flags.DEFINE_string("output", None, "The HF model folder to write (must not exist).")
flags.DEFINE_string("stage", None, "Which stage's checkpoint (default: the last stage of "
                    "the run's pipeline, in run.json).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                  "Stored dtype (default: the checkpoint's param_dtype).")
flags.DEFINE_string("max_shard_size", "2GB", "Largest safetensors shard, e.g. 2GB or 500MB.")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")
flags.DEFINE_enum("task", None, ["causal_lm", "reward"],
                  "Which model the export must be (default: whatever the checkpoint is): "
                  "causal_lm (*ForCausalLM) or reward (*ForSequenceClassification); a "
                  "checkpoint without that head is an error and nothing is written.")
flags.DEFINE_bool("adapter_only", False,
                  "LoRA runs: write the adapters alone as a PEFT LoRA folder (one "
                  "adapter_model.safetensors; --max_shard_size does not apply).")


def main(argv):
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required")
  from llmjax.hf.export import export_run
  out = export_run(FLAGS.workdir, FLAGS.output, FLAGS.stage, FLAGS.step, FLAGS.dtype,
                   FLAGS.max_shard_size, FLAGS.overwrite, FLAGS.adapter_only, FLAGS.task)
  print(out)


def run_main():
  common.run(main)


if __name__ == "__main__":
  run_main()
