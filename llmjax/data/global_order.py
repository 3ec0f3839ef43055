"""Training batches in one global order, whatever the number of processes reading them.

The contract every file-fed stage keeps (pretrain, sft, dpo, rm, distill's reference text):
the global batch of step s, its `batch_size` rows in process order, is a function of the
data, the config and s alone, never of the process count; process p of P yields rows
`[p * B / P, (p + 1) * B / P)`. So a run saved by P processes resumes on any P' that divides
`batch_size` and trains on exactly the batches the uninterrupted run would have.

Two ways to keep it:
- `from_streams` (pretraining): row r of every batch is the next row of stream r, which
  reads, tokenizes and packs its own documents (r, r + B, r + 2B, ... of the shuffled order).
  A process touches only its own streams' documents: no work is repeated across processes.
- `from_global_batches` (SFT and preference data, tokenized up front): every process runs
  the same pipeline of whole global batches (first-fit packing `batch_size` rows at a time,
  as a single process does) and keeps its rows. The packing is repeated on every process;
  it costs each one what it costs a single-process run of the same batch size.

The position is a JSON object of named parts (`stream/<r>`, or `global`). Each process
saves the parts it reads; `checkpoint.DataHandler` restores from every process's parts, so
any process count can pick up its own.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable

import grain
import numpy as np

from llmjax.errors import ConfigError, DataError

Batch = dict[str, np.ndarray]


def process_rows(batch_size: int, process_index: int, process_count: int,
                 setting: str) -> slice:
  """The rows of every global batch that process `process_index` yields."""
  if batch_size % process_count:
    raise ConfigError(f"{setting}={batch_size} must be divisible by the number of processes "
                      f"({process_count})")
  n = batch_size // process_count
  return slice(process_index * n, (process_index + 1) * n)


@dataclasses.dataclass(frozen=True)
class GlobalOrder:
  """This process's batches: `combine` of the next element of each of its `parts` (grain
  datasets named by their place in the global order). Iterating starts at the beginning."""
  parts: dict[str, grain.IterDataset]
  combine: Callable[[list[Any]], Batch]

  def __iter__(self) -> "GlobalOrderIterator":
    return GlobalOrderIterator(self)


class GlobalOrderIterator:
  """Iterates a `GlobalOrder`; `get_state()`/`set_state()` (JSON bytes) hold its parts'
  positions."""
  # `checkpoint.DataHandler` merges every process's saved parts before `set_state`.
  restores_on_any_process_count = True

  def __init__(self, order: GlobalOrder):
    self._names = list(order.parts)
    self._iters = [iter(ds) for ds in order.parts.values()]
    self._combine = order.combine

  def __iter__(self) -> "GlobalOrderIterator":
    return self

  def __next__(self) -> Batch:
    return self._combine([next(it) for it in self._iters])

  def get_state(self) -> bytes:
    return json.dumps({name: it.get_state() for name, it in zip(self._names, self._iters)},
                      sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    """Moves every part to its position in `state` (which may hold other processes' parts)."""
    saved = json.loads(state)
    missing = [name for name in self._names if name not in saved]
    if missing:
      raise DataError(f"the saved data position has no part {missing[0]!r} ({len(missing)} of "
                      f"{len(self._names)} missing): it was written by another data layout "
                      "(another batch_size, or an llmjax before the global data order); "
                      "resume with the data config it was written with, or a new --workdir")
    try:
      for name, it in zip(self._names, self._iters):
        it.set_state(_tuples(saved[name]))
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"the saved data position does not fit this data pipeline ({e}): resume "
                      "with the data config it was written with") from None

  def start_prefetch(self) -> None:
    """Called by the checkpoint handler after a restore; nothing is prefetched."""


def _tuples(state: Any) -> Any:
  """`state` read back from JSON with its lists as the tuples grain wrote: grain's packer
  compares its remainder slices with the tuple (-1, -1), and a list [-1, -1] restored a
  position without a remainder as one with it (the next row read a document too far)."""
  if isinstance(state, dict):
    return {k: _tuples(v) for k, v in state.items()}
  if isinstance(state, list):
    return tuple(_tuples(v) for v in state)
  return state


def _stack(rows: list[Batch]) -> Batch:
  return {k: np.stack([row[k] for row in rows]) for k in rows[0]}


def from_streams(make_stream: Callable[[int], grain.IterDataset], batch_size: int,
                 process_index: int, process_count: int, setting: str) -> GlobalOrder:
  """Batches `[batch_size // process_count, ...]` whose row r comes from `make_stream(r)`
  (a dataset of single rows); this process builds only its own streams."""
  rows = process_rows(batch_size, process_index, process_count, setting)
  return GlobalOrder({f"stream/{r}": make_stream(r) for r in range(rows.start, rows.stop)},
                     _stack)


class _Rows:
  def __init__(self, rows: slice):
    self.rows = rows

  def __call__(self, items: list[Batch]) -> Batch:
    return {k: v[self.rows] for k, v in items[0].items()}


def from_global_batches(batches: grain.IterDataset, batch_size: int, process_index: int,
                        process_count: int, setting: str) -> GlobalOrder:
  """This process's rows of every global batch of `batches` (`[batch_size, ...]` each)."""
  rows = process_rows(batch_size, process_index, process_count, setting)
  return GlobalOrder({"global": batches}, _Rows(rows))
