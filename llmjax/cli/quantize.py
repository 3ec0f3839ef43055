"""`llmjax-quantize`: weight-only int8/int4/NF4 quantization of a run's checkpoint.

  llmjax-quantize --workdir=runs/tiny --output=runs/tiny-int4 --scheme=int4 --group_size=64
  llmjax-quantize --workdir=runs/tiny --output=runs/tiny-nf4 --scheme=nf4 --eval_batches=8 \
      --gin_bindings="QuantConfig.kernel = 'reference'"

Writes `<output>/checkpoints/quantized/<step>/` (Orbax; restore with
`llmjax.runs.quantized.load_quantized`), a copy of the tokenizer, and `<output>/quant_report.json`:
eval loss of the float and the quantized model on the same held-out batches, and weight
bytes before and after. Quantization flags left unset take their value from gin's
`QuantConfig` (defaults: int4, group 64, pallas kernel).
"""

from __future__ import annotations

import dataclasses
import json
import os

import gin
from absl import app, flags

from llmjax.cli import common
from llmjax.errors import ConfigError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's (or an llmjax-import's) directory.")
flags.DEFINE_string("output", None, "Directory to write the quantized checkpoint and report to.")
flags.DEFINE_string("stage", None, "Which stage's checkpoint (default: the last stage of "
                    "the run's pipeline, in run.json).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("scheme", None, ["int4", "nf4", "int8"], "Quantization scheme.")
flags.DEFINE_integer("group_size", None, "Rows per int4/NF4 scale: 32, 64 or 128.")
flags.DEFINE_enum("kernel", None, ["pallas", "reference"],
                  "int4 matmul used for the report's eval (pallas runs interpreted on CPU).")
flags.DEFINE_bool("quantize_lm_head", None, "Also quantize the (untied) output projection.")
flags.DEFINE_integer("eval_batches", 4, "Held-out batches to compare losses on (0: skip).")
flags.DEFINE_integer("batch_size", 8, "Rows per eval batch.")
flags.DEFINE_integer("seq_len", 256, "Tokens per eval row.")
flags.DEFINE_enum("data_format", "builtin", ["builtin", "text", "jsonl", "arrayrecord"],
                  "Eval data format; 'builtin' is the synthetic world's eval split.")
flags.DEFINE_multi_string("eval_paths", [], "Eval files or globs (non-builtin formats).")
flags.DEFINE_string("field", None, "JSON field holding the text (jsonl: default text; "
                    "arrayrecord: unset reads UTF-8 text records).")
flags.DEFINE_multi_string("gin_file", [], "gin file(s) binding QuantConfig.")
flags.DEFINE_multi_string("gin_bindings", [], "gin bindings, e.g. \"QuantConfig.scheme = 'nf4'\".")
flags.DEFINE_bool("overwrite", False, "Replace an existing quantized checkpoint in --output.")


def quant_config_from_flags():
  """gin's `QuantConfig`, with the flags that were given taking precedence."""
  from llmjax.model import quant
  try:
    gin.parse_config_files_and_bindings(FLAGS.gin_file, FLAGS.gin_bindings,
                                        finalize_config=False)
  except (ValueError, SyntaxError, IOError) as e:
    raise ConfigError(f"gin config: {e}") from None
  given = {name: FLAGS[name].value for name in ("scheme", "group_size", "kernel",
                                                 "quantize_lm_head")
           if FLAGS[name].value is not None}
  return dataclasses.replace(quant.QuantConfig(), **given)


def eval_data_from_flags():
  """The held-out data to compare losses on, or None for --eval_batches=0."""
  from llmjax.data import pipeline
  if FLAGS.eval_batches <= 0:
    return None
  paths = tuple(FLAGS.eval_paths)
  if FLAGS.data_format != "builtin" and not paths:
    raise ConfigError(f"--data_format={FLAGS.data_format} needs --eval_paths")
  # The eval files double as the "train" source so they are validated as training data
  # is; only the eval split is read.
  return pipeline.DataConfig(format=FLAGS.data_format, train_paths=paths, eval_paths=paths,
                             field=FLAGS.field, seq_len=FLAGS.seq_len,
                             batch_size=FLAGS.batch_size, eval_batches=FLAGS.eval_batches)


def main(argv):
  if not FLAGS.workdir or not FLAGS.output:
    raise app.UsageError("--workdir and --output are required")
  if os.path.abspath(FLAGS.workdir) == os.path.abspath(FLAGS.output):
    raise app.UsageError("--output must differ from --workdir")
  from llmjax.runs.quantize_run import quantize_run
  cfg = quant_config_from_flags()
  report = quantize_run(FLAGS.workdir, FLAGS.output, cfg, stage=FLAGS.stage,
                        step=FLAGS.step, eval_data=eval_data_from_flags(),
                        overwrite=FLAGS.overwrite)
  print(json.dumps(report, indent=2))


def run_main():
  common.run(main)


if __name__ == "__main__":
  run_main()
