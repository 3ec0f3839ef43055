"""`llmjax-import`: turn a Hugging Face Llama/Qwen2 folder into an llmjax workdir.

  llmjax-import --hf=~/models/Qwen2.5-0.5B --output=runs/qwen [--dtype=bfloat16]

The result works with `llmjax-generate --workdir=`, `llmjax-export --workdir=` and
`pretrain.init_from = '<output>'` in gin.
"""

from __future__ import annotations

from absl import app, flags

from llmjax.cli import common

FLAGS = flags.FLAGS
flags.DEFINE_string("hf", None, "Folder with config.json and *.safetensors (+ tokenizer).")
flags.DEFINE_string("output", None, "The llmjax workdir to create (must not exist).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Parameter dtype to store.")
flags.DEFINE_bool("overwrite", False, "Replace --output if it exists.")


def main(argv):
  if not FLAGS.hf or not FLAGS.output:
    raise app.UsageError("--hf and --output are required")
  from llmjax.hf.import_ import import_hf
  out = import_hf(FLAGS.hf, FLAGS.output, FLAGS.dtype, FLAGS.overwrite)
  print(out)


def run_main():
  common.run(main)


if __name__ == "__main__":
  run_main()
