"""Document sources: random-access grain sources that return one document (a str) per index.

File sources index their files once, up front (so a malformed file fails before any model
is compiled), and keep only (file, byte offset, length) per document; `__getitem__` reads
the bytes back. They hold no open file handles, so they pickle cheaply into grain workers.
"""

from __future__ import annotations

import glob
import inspect
import json
import mmap
import os
import re
from typing import Any, Callable, Iterator, Sequence, TypeVar

import grain
import numpy as np

from llmjax.data import synthetic
from llmjax.errors import ConfigError, DataError

T = TypeVar("T")

FORMATS = ("text", "jsonl", "arrayrecord", "builtin")
MAX_REPORTED_PROBLEMS = 10
# One or more blank (whitespace-only) lines, tolerating CRLF line endings.
_BLANK_LINES = re.compile(rb"\r?\n(?:[ \t\f\v\r]*\r?\n)+")
_WHITESPACE = b" \t\r\n\f\v"


def _check_files(paths: Sequence[str]) -> list[str]:
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  paths = [os.fspath(p) for p in paths]
  for path in paths:
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file: check the path (wildcards such as "
                      "data/*.jsonl are expanded; a path without them must exist)")
  return paths


class _IndexedFiles(grain.sources.RandomAccessDataSource):
  """Base: documents are byte ranges of files; subclasses build the index and decode."""

  def __init__(self, paths: list[str], index: list[tuple[int, int, int]]):
    self.paths = paths
    arr = np.asarray(index, dtype=np.int64).reshape(-1, 3)
    self._file, self._offset, self._length = arr[:, 0], arr[:, 1], arr[:, 2]

  def __len__(self) -> int:
    return len(self._file)

  def _read(self, i: int) -> tuple[str, bytes]:
    if not -len(self) <= i < len(self):
      raise IndexError(f"document {i} out of range for {len(self)} documents")
    path = self.paths[self._file[i]]
    with open(path, "rb") as f:
      f.seek(int(self._offset[i]))
      return path, f.read(int(self._length[i]))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(paths={self.paths!r}, num_documents={len(self)})"


class TextSource(_IndexedFiles):
  """Plain text files; a document is a chunk between separators, stripped, empties dropped.

  The default separator "\\n\\n" means one or more blank lines (CRLF and whitespace-only
  lines count as blank), i.e. paragraphs. Any other separator is matched literally.
  """

  def __init__(self, paths: Sequence[str], separator: str = "\n\n"):
    paths = _check_files(paths)
    if not separator:
      raise ConfigError("TextSource separator must be non-empty, e.g. '\\n\\n' for paragraphs")
    self.separator = separator
    sep = _BLANK_LINES if separator == "\n\n" else re.compile(re.escape(separator.encode()))
    index = []
    for file_id, path in enumerate(paths):
      found = _index_text(path, sep)
      if not found:
        raise DataError(f"{path} is empty: it holds no text between separators "
                        f"{separator!r}; remove it from the inputs")
      index += [(file_id, off, n) for off, n in found]
    super().__init__(paths, index)

  def __getitem__(self, i: int) -> str:
    path, data = self._read(i)
    return data.decode("utf-8").strip()


def _index_text(path: str, sep: re.Pattern) -> list[tuple[int, int]]:
  """(offset, length) of each non-empty chunk of `path`, validating UTF-8."""
  if os.path.getsize(path) == 0:
    return []
  out = []
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
    start = 0
    bounds = [(m.start(), m.end()) for m in sep.finditer(mm)] + [(len(mm), len(mm))]
    for end, next_start in bounds:
      chunk = mm[start:end]
      stripped = chunk.strip(_WHITESPACE)
      if stripped:
        try:
          stripped.decode("utf-8")
        except UnicodeDecodeError as e:
          line = mm[:start].count(b"\n") + chunk[:e.start].count(b"\n") + 1
          raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason}): re-encode the file "
                          "as UTF-8") from None
        lead = len(chunk) - len(chunk.lstrip(_WHITESPACE))
        out.append((start + lead, len(stripped)))
      start = next_start
  return out


class JsonlSource(_IndexedFiles):
  """JSON Lines files; each non-blank line is an object whose `field` is the document.

  Every line is validated when the source is built. Bad lines raise DataError naming
  `path:line`, or with `skip_bad_lines=True` are skipped: `num_skipped` counts them and
  `problems` describes the first few.
  """

  def __init__(self, paths: Sequence[str], field: str = "text", skip_bad_lines: bool = False):
    paths = _check_files(paths)
    self.field = field
    self.skip_bad_lines = skip_bad_lines
    self.num_skipped = 0
    self.problems: list[str] = []
    index = []
    for file_id, path in enumerate(paths):
      before = len(index)
      index += [(file_id, off, n) for off, n in self._index_file(path)]
      if len(index) == before:
        skipped = " (every line was bad and skipped)" if os.path.getsize(path) else ""
        raise DataError(f"{path} is empty: it has no JSON lines with a {field!r} "
                        f"field{skipped}; fix the file or remove it from the inputs")
    super().__init__(paths, index)

  def _index_file(self, path: str) -> Iterator[tuple[int, int]]:
    offset = 0
    with open(path, "rb") as f:
      for line_no, raw in enumerate(f, start=1):
        start, offset = offset, offset + len(raw)
        if not raw.strip():
          continue  # blank lines separate nothing, so they are not errors
        problem = _json_problem(raw, self.field)
        if problem is None:
          yield start, len(raw)
          continue
        where = f"{path}:{line_no}: {problem}"
        if not self.skip_bad_lines:
          raise DataError(f"{where}: fix the line or set skip_bad_lines=True (DataConfig."
                          "skip_bad_lines, or --skip_bad_lines for llmjax-tokenizer) to skip it")
        self.num_skipped += 1
        if len(self.problems) < MAX_REPORTED_PROBLEMS:
          self.problems.append(where)

  def __getitem__(self, i: int) -> str:
    _, data = self._read(i)
    return json.loads(data)[self.field]


def json_error_where(e: json.JSONDecodeError) -> str:
  """json's message and column: 'Expecting value at column 3'. Some of its messages already
  end in 'at' ('Unterminated string starting at'), which must not become 'at at'."""
  at = "" if e.msg.endswith(" at") else " at"
  return f"{e.msg}{at} column {e.colno}"


def read_jsonl_records(paths: Sequence[str] | str, parse: Callable[[Any, str], T], *,
                       config: str, skip_bad_lines: bool = False
                       ) -> tuple[list[tuple[str, T]], int]:
  """`[(file:line, parse(record, file:line))]` of every non-blank line of JSONL files, and how
  many bad lines were skipped.

  A missing file is a DataError naming `config`'s paths. A line that is not JSON, or that
  `parse` rejects with a DataError, fails naming `file:line`, or with `skip_bad_lines` is
  counted and skipped (`config` names the class whose `skip_bad_lines` to set).
  """
  out: list[tuple[str, T]] = []
  skipped = 0
  for path in expand_paths(paths):
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file: check {config}.train_paths / eval_paths")
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        where = f"{path}:{lineno}"
        try:
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({json_error_where(e)}); fix the line "
                            f"or set {config}.skip_bad_lines = True") from None
          out.append((where, parse(record, where)))
        except DataError:
          if not skip_bad_lines:
            raise
          skipped += 1
  return out, skipped


def hold_out(examples: list[T], count: int, config: str) -> tuple[list[T], list[T]]:
  """(train, held out): `count` of `examples` held out for evaluation when a config gives no
  eval files. A fixed permutation, not the shuffle seed, so changing that seed never moves
  training examples into the held-out set."""
  if len(examples) <= count:
    raise ConfigError(f"{len(examples)} training examples are too few to hold out "
                      f"{config}.eval_examples={count}: give eval_paths or lower "
                      "eval_examples")
  order = np.random.default_rng(12345).permutation(len(examples))
  held = set(order[:count].tolist())
  return ([e for i, e in enumerate(examples) if i not in held],
          [examples[i] for i in sorted(held)])


def _json_problem(raw: bytes, field: str) -> str | None:
  """What is wrong with one JSONL line, or None."""
  try:
    obj = json.loads(raw)
  except UnicodeDecodeError as e:
    return f"not valid UTF-8 ({e.reason})"
  except json.JSONDecodeError as e:
    return f"not valid JSON ({json_error_where(e)})"
  if not isinstance(obj, dict):
    return f"expected a JSON object, got {type(obj).__name__}"
  if field not in obj:
    keys = ", ".join(sorted(obj)[:5]) or "none"
    return f"no {field!r} key (keys: {keys})"
  if not isinstance(obj[field], str):
    return f"{field!r} is {type(obj[field]).__name__}, expected a string"
  return None


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
  """ArrayRecord files of UTF-8 records; with `field`, each record is a JSON object."""

  def __init__(self, paths: Sequence[str], field: str | None = None):
    # Imported lazily: array_record is only needed for this format.
    from array_record.python.array_record_module import ArrayRecordReader
    self.paths = _check_files(paths)
    self.field = field
    counts = []
    for path in self.paths:
      try:
        reader = ArrayRecordReader(path)
        counts.append(reader.num_records())
        reader.close()
      except Exception as e:  # array_record raises bare RuntimeError/ValueError
        raise DataError(f"{path}: not a readable ArrayRecord file ({e}): check the format "
                        "flag or rewrite it with llmjax.data.sources.write_array_record") from None
      if counts[-1] == 0:
        raise DataError(f"{path} is empty: it has no records; remove it from the inputs")
    self._ends = np.cumsum(counts)
    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    self[0]  # decode one record now, so a wrong format or field fails before training

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, i: int) -> str:
    data = self._source[i]
    try:
      text = data.decode("utf-8")
      if self.field is None:
        return text
      obj = json.loads(text)
      if not isinstance(obj, dict) or not isinstance(obj.get(self.field), str):
        raise ValueError(f"expected a JSON object with a string {self.field!r} field")
      return obj[self.field]
    except ValueError as e:  # also UnicodeDecodeError and JSONDecodeError
      file_id = int(np.searchsorted(self._ends, i % len(self), side="right"))
      record = i % len(self) - (int(self._ends[file_id - 1]) if file_id else 0)
      hint = ("set field=None for plain-text records" if self.field else
              "set field to the JSON key if records are JSON")
      raise DataError(f"{self.paths[file_id]}: record {record}: {e}: fix the record or {hint}"
                      ) from None

  def __repr__(self) -> str:
    return f"ArrayRecordSource(paths={self.paths!r}, field={self.field!r})"


class BuiltinSource(grain.sources.RandomAccessDataSource):
  """The synthetic world's pretraining documents (see `llmjax.data.synthetic`)."""

  def __init__(self, split: str, num_documents: int | None = None, seed: int = 0):
    self.split, self.seed = split, seed
    self._docs = synthetic.pretraining_documents(split, num_documents, seed)

  def __len__(self) -> int:
    return len(self._docs)

  def __getitem__(self, i: int) -> str:
    return self._docs[i]

  def __repr__(self) -> str:
    return f"BuiltinSource(split={self.split!r}, num_documents={len(self)}, seed={self.seed})"


def expand_paths(paths: Sequence[str] | str) -> list[str]:
  """Expands glob patterns (sorted); a pattern that matches nothing is a DataError."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for path in map(os.fspath, paths):
    if glob.has_magic(path):
      matches = sorted(glob.glob(path, recursive=True))
      if not matches:
        raise DataError(f"{path}: the pattern matches no files: check the path")
      out += matches
    else:
      out.append(path)
  return out


_CLASSES = {"text": TextSource, "jsonl": JsonlSource, "arrayrecord": ArrayRecordSource,
            "builtin": BuiltinSource}


def make_source(format: str, paths: Sequence[str] | str = (), **kwargs: Any
                ) -> grain.sources.RandomAccessDataSource:
  """A document source for `format` ('text', 'jsonl', 'arrayrecord' or 'builtin').

  `paths` (files or glob patterns) are ignored for 'builtin', which takes `split`,
  `num_documents` and `seed` keyword arguments instead. Other kwargs go to the source class.
  """
  if format not in _CLASSES:
    raise ConfigError(f"unknown data format {format!r}: use one of {', '.join(FORMATS)}")
  cls = _CLASSES[format]
  if format == "builtin":
    kwargs.setdefault("split", "train")
    args = ()
  else:
    files = expand_paths(paths)
    if not files:
      raise ConfigError(f"format {format!r} needs input files: give one or more paths or "
                        "globs (DataConfig.train_paths / --input)")
    args = (files,)
  try:
    inspect.signature(cls).bind(*args, **kwargs)
  except TypeError as e:
    raise ConfigError(f"bad options {sorted(kwargs)} for format {format!r}: {e}") from None
  return cls(*args, **kwargs)


def iter_texts(source: Any) -> Iterator[str]:
  """Yields every document of a random-access source, in order."""
  for i in range(len(source)):
    yield source[i]


def write_array_record(path: str, texts: Sequence[str | bytes]) -> int:
  """Writes one record per text (UTF-8) to an ArrayRecord file; returns the record count."""
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(os.fspath(path), "group_size:1")
  n = 0
  try:
    for text in texts:
      writer.write(text.encode("utf-8") if isinstance(text, str) else bytes(text))
      n += 1
  finally:
    writer.close()
  return n
