"""llmjax-tokenizer: train a SentencePiece tokenizer on text, JSONL or ArrayRecord files.

  llmjax-tokenizer --input='data/*.jsonl' --vocab_size=8000 --output=tok.model
  llmjax-tokenizer --builtin --output=builtin.model   # the synthetic world's train split
"""

from __future__ import annotations

import os

from absl import flags

from llmjax.cli import common
from llmjax.data import sources, synthetic, tokenizer
from llmjax.errors import ConfigError

_INPUT = flags.DEFINE_multi_string("input", [], "Input files or glob patterns.")
_FORMAT = flags.DEFINE_enum(
    "format", None, ["text", "jsonl", "arrayrecord"],
    "Input format; by default guessed from the extension (.jsonl/.json: jsonl, "
    ".array_record/.arrayrecord: arrayrecord, anything else: text).")
_FIELD = flags.DEFINE_string(
    "field", "text", "JSON key holding the text. For arrayrecord, records are read as JSON "
    "objects only when --field is given explicitly; otherwise as plain UTF-8 text.")
_SKIP_BAD_LINES = flags.DEFINE_bool("skip_bad_lines", False,
                                    "Skip and count malformed JSONL lines instead of failing.")
_BUILTIN = flags.DEFINE_bool("builtin", False,
                             "Train on the built-in synthetic train split instead of --input.")
_BUILTIN_DOCUMENTS = flags.DEFINE_integer(
    "builtin_documents", None, "Documents of the builtin split to use (default: all).")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 512, "Number of pieces.")
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", list(tokenizer.MODEL_TYPES),
                                "SentencePiece model type.")
_BYTE_FALLBACK = flags.DEFINE_bool("byte_fallback", True,
                                   "Encode unseen characters as UTF-8 bytes instead of <unk>.")
_MAX_SENTENCES = flags.DEFINE_integer("max_sentences", 200_000,
                                      "Train on at most this many lines.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the .model file.")

_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".array_record": "arrayrecord",
               ".arrayrecord": "arrayrecord"}


def guess_format(paths: list[str]) -> str:
  """The format implied by the files' extensions; ConfigError if they disagree."""
  formats = {_EXTENSIONS.get(os.path.splitext(p)[1].lower(), "text") for p in paths}
  if len(formats) > 1:
    raise ConfigError(f"--input mixes formats ({', '.join(sorted(formats))}) judging by the "
                      "file extensions: pass --format, or train on one kind of file")
  return formats.pop()


def _source():
  if _BUILTIN.value:
    if _INPUT.value:
      raise ConfigError("--builtin and --input are exclusive: give one of them")
    return sources.make_source("builtin", split="train",
                               num_documents=_BUILTIN_DOCUMENTS.value), "builtin"
  if not _INPUT.value:
    raise ConfigError("no training text: pass --input=FILE_OR_GLOB (repeatable) or --builtin")
  paths = sources.expand_paths(_INPUT.value)
  fmt = _FORMAT.value or guess_format(paths)
  kwargs = {}
  if fmt == "jsonl":
    kwargs = {"field": _FIELD.value, "skip_bad_lines": _SKIP_BAD_LINES.value}
  elif fmt == "arrayrecord":
    kwargs = {"field": _FIELD.value if flags.FLAGS["field"].present else None}
  source = sources.make_source(fmt, paths, **kwargs)
  skipped = getattr(source, "num_skipped", 0)
  if skipped:
    print(f"skipped {skipped} bad lines, first ones:", *source.problems, sep="\n  ")
  return source, f"{len(paths)} {fmt} file(s)"


def main(argv: list[str]) -> None:
  if not _OUTPUT.value:
    raise ConfigError("--output is required: where to write the tokenizer .model file")
  source, what = _source()
  print(f"training a {_MODEL_TYPE.value} tokenizer on {len(source)} documents from {what}")
  tok = tokenizer.train_tokenizer(
      sources.iter_texts(source), _OUTPUT.value, vocab_size=_VOCAB_SIZE.value,
      model_type=_MODEL_TYPE.value, byte_fallback=_BYTE_FALLBACK.value,
      max_sentences=_MAX_SENTENCES.value)
  sample = source[0][:80] if _INPUT.value else synthetic.pretraining_documents("eval", 1)[0]
  ids = tok.encode(sample)
  print(f"vocab_size: {tok.vocab_size}")
  print(f"sample: {sample!r}")
  print(f"  -> {len(ids)} tokens: {[tok.id_to_piece(i) for i in ids][:24]}")
  print(f"  -> decoded: {tok.decode(ids)!r}")
  print(f"wrote {os.path.abspath(_OUTPUT.value)}")


def run_main() -> None:
  common.run(main)


if __name__ == "__main__":
  run_main()
