"""grain pipelines: documents -> tokens -> packed `seq_len` rows -> batches.

Training row r of every batch comes from row stream r (documents r, r + batch_size, ...),
so the global batches are the same on any number of processes (`global_order`).

Rows are packed with concat-then-split: documents are laid end to end and cut at `seq_len`,
so no compute is spent on padding except at the very end of a finite dataset. Each row
carries `segment_ids` (1, 2, ... per document, 0 = padding) and `positions` (restarting at 0
per document) so attention never crosses a document boundary.

Batch layout (numpy, int32, `[batch, seq_len]`): `tokens`, `targets`, `loss_mask`,
`segment_ids`, `positions`. Targets are shifted per document *before* packing, so the last
token of one document is never trained to predict the first of the next.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import grain
from absl import logging
import numpy as np

from llmjax.data import global_order
from llmjax.data import sources as sources_lib
from llmjax.data.tokenizer import Tokenizer
from llmjax.errors import ConfigError

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


def as_paths(value: Any) -> Any:
  """A path list field's value as a tuple; a bare string is one path (not its characters)."""
  if isinstance(value, str):
    return (value,)
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return value  # gin.REQUIRED and the like: checked when the stage is configured


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where the text comes from and how it is cut into batches.

  Attributes:
    format: 'builtin' (the synthetic world), 'text', 'jsonl' or 'arrayrecord'.
    train_paths: files or globs for the file formats.
    eval_paths: held-out files; when empty, `eval_documents` documents of the training
      source are held out (a fixed, seed-independent selection).
    field: the JSON field holding the text: for jsonl (None means 'text'), and for
      arrayrecord files of JSON records (None: each record is UTF-8 text).
    skip_bad_lines: skip and count malformed JSONL lines instead of failing.
    seq_len: tokens per packed row.
    batch_size: rows per optimizer step, summed over all processes and microbatches.
    eval_documents: documents held out for eval when `eval_paths` is empty.
    eval_batches: batches per evaluation.
    seed: shuffling seed (each epoch reshuffles).
    num_epochs: None repeats forever.
  """
  format: str = "builtin"
  train_paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()
  field: str | None = None
  skip_bad_lines: bool = False
  seq_len: int = 256
  batch_size: int = 16
  eval_documents: int = 500
  eval_batches: int = 4
  seed: int = 0
  num_epochs: int | None = None

  def __post_init__(self):
    for name in ("train_paths", "eval_paths"):
      object.__setattr__(self, name, as_paths(getattr(self, name)))
    if self.format not in sources_lib.FORMATS:  # checked here: before anything compiles
      raise ConfigError(f"DataConfig.format={self.format!r}: use one of "
                        f"{', '.join(sources_lib.FORMATS)}")
    if self.seq_len < 2:
      raise ConfigError(f"DataConfig.seq_len must be at least 2 (one input and one target "
                        f"token), got {self.seq_len}")
    if self.batch_size < 1:
      raise ConfigError(f"DataConfig.batch_size must be positive, got {self.batch_size}")


def document_sources(cfg: DataConfig) -> tuple[Any, Any]:
  """(train, eval) random-access sources of documents (str). Fails fast on bad files."""
  if cfg.format == "builtin":
    return sources_lib.BuiltinSource("train", seed=cfg.seed), sources_lib.BuiltinSource("eval")
  kwargs = {}
  if cfg.format == "jsonl":
    kwargs = {"skip_bad_lines": cfg.skip_bad_lines, "field": cfg.field or "text"}
  elif cfg.format == "arrayrecord":
    kwargs = {"field": cfg.field}
  train = _report_skipped(sources_lib.make_source(cfg.format, list(cfg.train_paths), **kwargs))
  if cfg.eval_paths:
    return train, _report_skipped(
        sources_lib.make_source(cfg.format, list(cfg.eval_paths), **kwargs))
  if len(train) <= cfg.eval_documents:
    raise ConfigError(f"the training data has {len(train)} documents, too few to hold out "
                      f"DataConfig.eval_documents={cfg.eval_documents} for eval: give "
                      "eval_paths or lower eval_documents")
  # A fixed permutation (not cfg.seed) so changing the shuffle seed never leaks eval data.
  held_out = grain.MapDataset.source(train).shuffle(seed=12345)
  return held_out[cfg.eval_documents:], held_out[:cfg.eval_documents]


def _report_skipped(source: Any) -> Any:
  """Says how many malformed lines `skip_bad_lines` dropped, and the first few reasons."""
  skipped = getattr(source, "num_skipped", 0)
  if skipped:
    logging.warning("skipped %d malformed line(s) in %s (DataConfig.skip_bad_lines=True); "
                    "first: %s", skipped, source, "; ".join(source.problems[:3]))
  return source


class TokenizeDocument:
  """Document text -> `inputs`/`targets`/`loss_mask` arrays (picklable for grain workers)."""

  def __init__(self, tokenizer: Tokenizer):
    self.tokenizer = tokenizer

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    ids = np.asarray(self.tokenizer.encode(text, add_bos=True, add_eos=True), np.int32)
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": np.ones(len(ids) - 1, np.int32)}


def pack_documents(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Packs per-document `inputs`/`targets`/`loss_mask` into rows of `seq_len` (see module doc)."""
  packed = grain.experimental.ConcatThenSplitIterDataset(
      ds, length_struct={"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len})
  return packed.map(rename_packed)


def rename_packed(row: dict[str, np.ndarray]) -> Batch:
  """A row of grain's packers (`inputs`, `inputs_segment_ids`, ...) in the batch layout."""
  return {"tokens": row["inputs"], "targets": row["targets"], "loss_mask": row["loss_mask"],
          "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"]}


def train_dataset(cfg: DataConfig, tokenizer: Tokenizer, train_source: Any,
                  process_index: int = 0, process_count: int = 1) -> global_order.GlobalOrder:
  """This process's infinite (or `num_epochs`) stream of training batches, each
  `[batch_size // process_count, seq_len]`.

  Row r of every global batch is the next row of row stream r: documents r, r + B, r + 2B,
  ... (B = batch_size) of the shuffled order (reshuffled every epoch), tokenized and packed
  by themselves. The global batches are the same for any number of processes
  (`llmjax.data.global_order`); a process reads only its own streams' documents.
  """
  docs = grain.MapDataset.source(train_source).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
  tokenize = TokenizeDocument(tokenizer)

  def stream(r: int) -> grain.IterDataset:
    # Read in the calling thread: grain's default is 16 threads and 500 documents ahead,
    # per stream (thousands of threads for a large batch).
    ds = docs[r::cfg.batch_size].map(tokenize).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    return pack_documents(ds, cfg.seq_len)

  return global_order.from_streams(stream, cfg.batch_size, process_index, process_count,
                                   "DataConfig.batch_size")


def eval_batches(cfg: DataConfig, tokenizer: Tokenizer, eval_source: Any,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """This process's rows of the fixed held-out batches (the same every evaluation, padded
  rows masked out). Every process packs the whole (small) held-out set, so the batches are
  the same for any number of processes."""
  rows = global_order.process_rows(cfg.batch_size, process_index, process_count,
                                   "DataConfig.batch_size")
  tokens = grain.MapDataset.source(eval_source).map(TokenizeDocument(tokenizer))
  ds = pack_documents(tokens.to_iter_dataset(), cfg.seq_len).batch(cfg.batch_size)
  out = []
  for batch in ds:
    out.append({k: v[rows] for k, v in pad_rows(batch, cfg.batch_size).items()})
    if len(out) == cfg.eval_batches:
      break
  if not out:
    raise ConfigError("the eval split produced no batches: give more eval documents")
  return out


def pad_rows(batch: Batch, rows: int) -> Batch:
  """Pads a short final batch with all-padding rows so every eval batch has one shape."""
  n = batch["tokens"].shape[0]
  if n == rows:
    return batch
  return {k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)]) for k, v in
          batch.items()}
