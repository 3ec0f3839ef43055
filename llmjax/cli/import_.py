"""`llmjax-import`: turn a Hugging Face Llama/Qwen2/Mixtral/Qwen2-MoE folder into an llmjax
workdir.

  llmjax-import --hf=~/models/Qwen2.5-0.5B --output=runs/qwen [--dtype=bfloat16]
  llmjax-import --hf=~/models/Qwen2.5-0.5B --peft=~/adapters/qwen-sft --output=runs/qwen-sft

With `--peft` (a PEFT LoRA folder trained on the --hf model) the workdir holds two stages,
`import` (the base) and `peft` (the adapters, a LoRA checkpoint on it); the run's default is
the adapted model.

The result works with `llmjax-generate --workdir=`, `llmjax-export --workdir=` and
`pretrain.init_from = '<output>'` in gin.
"""

from __future__ import annotations

from absl import app, flags

from llmjax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("hf", None, "Folder with config.json and *.safetensors (+ tokenizer).")
flags.DEFINE_string("output", None, "The llmjax workdir to create (must not exist).")
flags.DEFINE_string("peft", None, "Optional PEFT LoRA folder (adapter_config.json + "
                    "adapter_model.safetensors) to import on top of --hf.")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype to store.")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


def main(argv):
  if not FLAGS.hf or not FLAGS.output:
    raise app.UsageError("--hf and --output are required")
  from llmjax.hf.import_ import import_hf
  out = import_hf(FLAGS.hf, FLAGS.output, FLAGS.dtype, FLAGS.overwrite, FLAGS.peft)
  print(out)


def run_main():
  common.run(main)


if __name__ == "__main__":
  run_main()
