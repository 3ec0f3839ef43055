"""Preference-pair data for the reward-model and DPO stages: sources, tokenization, packing.

A pair is a prompt with two completions, one preferred ('chosen') and one not ('rejected').
Sources, all normalised to `{"prompt": [messages], "chosen": [messages], "rejected":
[messages]}` (messages are `{role, content}`, see `llmjax.data.chat`):
  * JSONL, one pair per line:
    - standard: `{"prompt": str, "chosen": str, "rejected": str}` (a string prompt is one user
      message, a string completion one assistant message);
    - conversational: `prompt` a list of messages, `chosen`/`rejected` lists of messages
      starting with an assistant message (either may also be a string, as above);
    - implicit prompt: no `prompt`; `chosen` and `rejected` are whole conversations sharing a
      prefix, split at their longest common message prefix (each completion must then start
      with an assistant message).
  * 'builtin': the synthetic world's questions, the true answer chosen and a plausible wrong
    one rejected (`synthetic.preference_pairs`), with a held-out eval split.
Pairs whose chosen and rejected are identical are counted and dropped. A JSONL pair may carry
a numeric `margin` (TRL's column): the reward model's Bradley-Terry margin for that pair.

Each pair is tokenized up front into two sequences, prompt + chosen and prompt + rejected,
whose loss mask covers only the completion's assistant tokens (never a prompt token, even of
an assistant turn inside the prompt). Both sequences of a pair always live in one row, so
rows are whole pairs: row sharding and strided row microbatching never split a pair.

Batch layout (numpy, each `[rows, seq_len]` unless noted; P = max_pairs_per_row):
  tokens, targets, loss_mask (int32): as in `llmjax.data.pipeline`; loss_mask is 1 only on
    completion targets.
  segment_ids (int32): each sequence its own segment: the chosen sequence of the row's k-th
    pair is 2k + 1, its rejected sequence 2k + 2; 0 on padding.
  positions (int32): restart at 0 for each sequence; 0 on padding.
  pair_slot (int32): k in [0, P) on both sequences of the row's k-th pair; -1 on padding.
  chosen (int32): 1 on the chosen sequence's tokens, 0 on the rejected one's and padding.
  ref_logps (float32): 0, except the reference log-prob of a sequence (summed over its
    completion) on its first token, once attached (`attach_reference_logps`); summing over a
    sequence's tokens, not masked by loss_mask, gives it back exactly.
  margin (float32): 0, except a pair's optional `margin` (JSONL; the reward model's
    Bradley-Terry margin, as TRL's) on the first token of its chosen sequence.
  pair_index (int32, `[rows, P]`): the example index (`example["index"]`) of the row's k-th
    pair, -1 for an empty slot.
With P = 1 every row holds one pair and padding (the padded layout); with P > 1 whole pairs
are first-fit packed, at most P to a row. `sequence_sums` and `pair_valid` read the layout in
JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import gin
import grain
import jax
import jax.numpy as jnp
import numpy as np

from llmjax.data import chat, global_order, synthetic
from llmjax.data.pipeline import as_paths, pad_rows
from llmjax.data.sources import hold_out, read_jsonl_records
from llmjax.errors import ConfigError, DataError

OVERLONG_RULES = ("truncate_prompt", "truncate_end", "drop")
FORMATS = ("builtin", "jsonl")
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions", "pair_slot",
              "chosen", "ref_logps", "margin", "pair_index")
# Per-token fields of a tokenized example (the pair's chosen sequence, then its rejected one).
TOKEN_FIELDS = ("inputs", "targets", "loss_mask", "half", "seq_positions", "ref_logps",
                "margin")

Messages = list[dict[str, str]]
Pair = dict[str, Messages]
Batch = dict[str, np.ndarray]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
  """Where the preference pairs come from and how they become batches.

  Attributes:
    format: 'builtin' (the synthetic world's questions, true vs wrong answer) or 'jsonl'.
    train_paths, eval_paths: JSONL files or globs; with no eval_paths, `eval_examples` pairs
      of the training files are held out (a fixed selection).
    seq_len: tokens per row. A pair needs len(chosen sequence) + len(rejected sequence)
      tokens (each sequence its rendered prompt + completion ids).
    batch_size: rows per optimizer step (summed over processes and microbatches).
    max_pairs_per_row: 1 = one pair per row, padded; more = whole pairs first-fit packed,
      at most this many to a row.
    overlong: 'truncate_prompt' (cut the shared prompt from the left, keeping bos, equally in
      both sequences; then the completions' ends if still needed), 'truncate_end' (cut each
      sequence's end) or 'drop'. Truncated and dropped pairs are counted.
    skip_bad_lines: count and skip malformed JSONL lines instead of failing.
    builtin_train, builtin_eval: sizes of the built-in pair sets.
    eval_examples: held-out pairs when there are no eval_paths (jsonl).
    eval_batches: batches per evaluation.
    seed: shuffling seed. num_epochs: None repeats forever.
  """
  format: str = "builtin"
  train_paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()
  seq_len: int = 256
  batch_size: int = 16
  max_pairs_per_row: int = 1
  overlong: str = "truncate_prompt"
  skip_bad_lines: bool = False
  builtin_train: int = 2000
  builtin_eval: int = 300
  eval_examples: int = 200
  eval_batches: int = 4
  seed: int = 0
  num_epochs: int | None = None

  def __post_init__(self):
    for name in ("train_paths", "eval_paths"):
      object.__setattr__(self, name, as_paths(getattr(self, name)))
    name = "PreferenceDataConfig"
    if self.format not in FORMATS:
      raise ConfigError(f"{name}.format={self.format!r}: use one of {FORMATS}")
    if self.overlong not in OVERLONG_RULES:
      raise ConfigError(f"{name}.overlong={self.overlong!r}: use one of {OVERLONG_RULES}")
    if self.seq_len < 8 or self.batch_size < 1:
      raise ConfigError(f"{name} needs seq_len >= 8 and batch_size >= 1, got "
                        f"seq_len={self.seq_len}, batch_size={self.batch_size}")
    if self.max_pairs_per_row < 1:
      raise ConfigError(f"{name}.max_pairs_per_row={self.max_pairs_per_row}: use 1 (one pair "
                        "per row, padded) or more (pairs packed)")
    if self.builtin_train < 1 or self.builtin_eval < 1:
      raise ConfigError(f"{name}.builtin_train and builtin_eval must be positive, got "
                        f"{self.builtin_train} and {self.builtin_eval}")
    if self.eval_examples < 1 or self.eval_batches < 1:
      raise ConfigError(f"{name}.eval_examples and eval_batches must be positive, got "
                        f"{self.eval_examples} and {self.eval_batches}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ConfigError(f"{name}.num_epochs={self.num_epochs}: use None (repeat forever) or "
                        "a positive number")


# ---- Sources ----

@dataclasses.dataclass
class SourceStats:
  """What reading the sources did: pairs kept, malformed lines skipped, identical dropped."""
  pairs: int = 0
  skipped_lines: int = 0
  dropped_identical: int = 0

  def as_dict(self, prefix: str = "") -> dict[str, int]:
    return {prefix + k: v for k, v in dataclasses.asdict(self).items()}


def _messages(value: Any, field: str, where: str) -> Messages:
  """A string-or-messages field as messages: a string is one message (user for 'prompt',
  assistant for a completion)."""
  if isinstance(value, str):
    return [{"role": "user" if field == "prompt" else "assistant", "content": value}]
  if isinstance(value, list):
    if not value:
      raise DataError(f"{where}: '{field}' is an empty list; give at least one message")
    return chat.validate_messages(value, f"{where}: '{field}'")
  raise DataError(f"{where}: '{field}' must be a string or a list of {{role, content}} "
                  f"messages, got {type(value).__name__}")


def _check_completion(messages: Messages, field: str, where: str) -> None:
  if not messages or all(not m["content"].strip() for m in messages):
    raise DataError(f"{where}: empty completion in '{field}': give the reply text, or drop "
                    "the line")
  if messages[0]["role"] != "assistant":
    raise DataError(f"{where}: '{field}' completion starts with a {messages[0]['role']} "
                    "message; a completion must start with an assistant message")
  if any(m["role"] == "system" for m in messages):
    raise DataError(f"{where}: '{field}' completion has a system message; only the first "
                    "message of the prompt may be one")


def normalize_pair(record: Any, where: str) -> Pair | None:
  """`{prompt, chosen, rejected}` as messages from a record in any accepted form (see the
  module doc); None when chosen and rejected are identical. DataError naming `where`."""
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  missing = [k for k in ("chosen", "rejected") if k not in record]
  if missing:
    raise DataError(f"{where}: missing {missing}: a preference pair needs 'chosen' and "
                    f"'rejected' (and optionally 'prompt'); keys are {sorted(record)[:8]}")
  if "prompt" in record:
    prompt = _messages(record["prompt"], "prompt", where)
    chosen = _messages(record["chosen"], "chosen", where)
    rejected = _messages(record["rejected"], "rejected", where)
  else:
    for k in ("chosen", "rejected"):
      if not isinstance(record[k], list):
        raise DataError(f"{where}: with no 'prompt', '{k}' must be a whole conversation (a "
                        f"list of messages) sharing its prompt with the other, got "
                        f"{type(record[k]).__name__}; add a 'prompt' field for string "
                        "completions")
    whole_c = _messages(record["chosen"], "chosen", where)
    whole_r = _messages(record["rejected"], "rejected", where)
    n = 0
    while n < min(len(whole_c), len(whole_r)) and whole_c[n] == whole_r[n]:
      n += 1
    if n == len(whole_c) == len(whole_r):
      return None  # identical conversations: nothing to prefer
    prompt, chosen, rejected = whole_c[:n], whole_c[n:], whole_r[n:]
  _check_completion(chosen, "chosen", where)
  _check_completion(rejected, "rejected", where)
  if chosen == rejected:
    return None
  pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
  if "margin" in record:
    margin = record["margin"]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin != margin:
      raise DataError(f"{where}: 'margin' must be a number (how much more the chosen "
                      f"completion is preferred), got {margin!r}")
    pair["margin"] = float(margin)
  return pair


def read_jsonl(paths: Sequence[str] | str, skip_bad_lines: bool = False
               ) -> tuple[list[Pair], SourceStats]:
  """(normalised pairs, stats) of JSONL files of preference pairs.

  A malformed line is a DataError naming `file:line`, unless `skip_bad_lines` (then counted
  in `stats.skipped_lines`). Blank lines are ignored; identical pairs are counted and dropped.
  """
  records, skipped = read_jsonl_records(paths, normalize_pair, config="PreferenceDataConfig",
                                       skip_bad_lines=skip_bad_lines)
  pairs = [pair for _, pair in records if pair is not None]
  stats = SourceStats(skipped_lines=skipped, dropped_identical=len(records) - len(pairs))
  if not pairs:
    raise DataError(f"{paths}: no preference pairs found: the files are empty or every line "
                    f"was skipped or identical ({stats.as_dict()})")
  stats.pairs = len(pairs)
  return pairs, stats


def builtin_pairs(split: str, num: int, seed: int = 0) -> list[Pair]:
  """The synthetic world's questions as pairs: the true answer chosen, a wrong one rejected.
  'eval' questions (held-out phrasings and arithmetic) never occur in 'train'."""
  out = []
  for p in synthetic.preference_pairs(split, num, seed):
    pair = normalize_pair({k: str(v) for k, v in p.items()}, f"builtin {split} pair")
    if pair is not None:
      out.append(pair)
  return out


def load_pairs(cfg: PreferenceDataConfig) -> tuple[list[Pair], list[Pair], SourceStats]:
  """(train, eval, stats) normalised pairs for `cfg`; stats cover both splits."""
  if cfg.format == "builtin":
    train = builtin_pairs("train", cfg.builtin_train, cfg.seed)
    evals = builtin_pairs("eval", cfg.builtin_eval)
    return train, evals, SourceStats(pairs=len(train) + len(evals))
  if not cfg.train_paths:
    raise ConfigError("PreferenceDataConfig.train_paths is empty: give JSONL files of "
                      "preference pairs for format='jsonl'")
  train, stats = read_jsonl(list(cfg.train_paths), cfg.skip_bad_lines)
  if cfg.eval_paths:
    evals, more = read_jsonl(list(cfg.eval_paths), cfg.skip_bad_lines)
    return train, evals, SourceStats(*(a + b for a, b in zip(
        dataclasses.astuple(stats), dataclasses.astuple(more))))
  train, held = hold_out(train, cfg.eval_examples, "PreferenceDataConfig")
  return train, held, stats


# ---- Tokenization and truncation ----

@dataclasses.dataclass
class TokenizeStats:
  """What tokenization did to the pairs (each pair counted once)."""
  examples: int = 0
  truncated: int = 0
  dropped_overlong: int = 0  # overlong under 'drop'
  dropped_identical: int = 0  # the two sequences identical (after truncation)
  dropped_empty: int = 0  # a sequence with no completion token left to train on

  def as_dict(self, prefix: str = "") -> dict[str, int]:
    return {prefix + k: v for k, v in dataclasses.asdict(self).items()}


def _split_budget(a: int, b: int, budget: int) -> tuple[int, int]:
  """Lengths of two parts of lengths a, b fitting `budget` together: a part shorter than
  half keeps all of it, the other takes the rest (the first gets an odd token)."""
  if a + b <= budget:
    return a, b
  half = budget // 2
  if a <= half:
    return a, budget - a
  if b <= half:
    return budget - b, b
  return budget - half, half


def fit_pair(chosen: tuple[list[int], list[int]], rejected: tuple[list[int], list[int]],
             n_prompt: int, max_total: int, rule: str, bos_id: int | None
             ) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]]] | None:
  """Fits a pair's two rendered sequences, `(ids, mask)` each sharing their first `n_prompt`
  tokens, into `max_total` ids together by `rule` (see PreferenceDataConfig); None = drop."""
  (c_ids, c_mask), (r_ids, r_mask) = chosen, rejected
  if len(c_ids) + len(r_ids) <= max_total:
    return chosen, rejected
  if rule == "drop":
    return None
  if rule == "truncate_end":
    lc, lr = _split_budget(len(c_ids), len(r_ids), max_total)
    return (c_ids[:lc], c_mask[:lc]), (r_ids[:lr], r_mask[:lr])
  # truncate_prompt: drop the oldest prompt tokens, the same ones from both sequences.
  lead = 1 if bos_id is not None and bos_id >= 0 and n_prompt and c_ids[0] == bos_id else 0
  excess = len(c_ids) + len(r_ids) - max_total
  cut = min(n_prompt - lead, -(-excess // 2))
  kept = n_prompt - cut
  c_ids, c_mask = c_ids[:lead] + c_ids[lead + cut:], c_mask[:lead] + c_mask[lead + cut:]
  r_ids, r_mask = r_ids[:lead] + r_ids[lead + cut:], r_mask[:lead] + r_mask[lead + cut:]
  # Still too long with the prompt cut to bos: cut the completions' ends.
  lc, lr = _split_budget(len(c_ids) - kept, len(r_ids) - kept, max_total - 2 * kept)
  return ((c_ids[:kept + lc], c_mask[:kept + lc]), (r_ids[:kept + lr], r_mask[:kept + lr]))


def tokenize_pairs(pairs: Sequence[Pair], tokenizer: Any, template: str, seq_len: int,
                   overlong: str) -> tuple[list[dict[str, Any]], TokenizeStats]:
  """Tokenized examples, one per kept pair, and what truncation did.

  An example has `index` (int: its position in the returned list, the row of a reference
  log-prob table) and per-token fields, each `[n]` with n = len(chosen seq) + len(rejected
  seq) <= seq_len, the chosen sequence first:
    inputs, targets, loss_mask (int32): per sequence all its `ids`, the next ids (`ids[1:]`
      then 0) and the completion mask of those targets (0 at the last position). The last
      token is an input, not only a target, so a reward head reads its score at the token
      Hugging Face's `*ForSequenceClassification` reads: the sequence's last;
    half (int32): 1 on the chosen sequence, 2 on the rejected one;
    seq_positions (int32): 0, 1, ... within each sequence;
    ref_logps (float32): zeros (see `attach_reference_logps`).
  """
  stats = TokenizeStats()
  out: list[dict[str, Any]] = []
  for pair in pairs:
    stats.examples += 1
    n_prompt = len(chat.render_chat(pair["prompt"], template, tokenizer)[0])
    seqs = []
    for key in ("chosen", "rejected"):
      ids, mask = chat.render_chat(pair["prompt"] + pair[key], template, tokenizer)
      # Only the completion trains: an assistant turn inside the prompt is context.
      seqs.append((ids, [0] * n_prompt + mask[n_prompt:]))
    fitted = fit_pair(seqs[0], seqs[1], n_prompt, seq_len, overlong, tokenizer.bos_id)
    if fitted is None:
      stats.dropped_overlong += 1
      continue
    if fitted != tuple(seqs):
      stats.truncated += 1
    if not all(any(mask[1:]) for _, mask in fitted):
      stats.dropped_empty += 1
      continue
    if fitted[0] == fitted[1]:
      stats.dropped_identical += 1
      continue
    fields: dict[str, list[np.ndarray]] = {k: [] for k in TOKEN_FIELDS}
    for half, (ids, mask) in enumerate(fitted, 1):
      ids = np.asarray(ids, np.int32)
      n = len(ids)
      fields["inputs"].append(ids)
      fields["targets"].append(np.append(ids[1:], 0).astype(np.int32))
      fields["loss_mask"].append(np.asarray(mask[1:] + [0], np.int32))
      fields["half"].append(np.full(n, half, np.int32))
      fields["seq_positions"].append(np.arange(n, dtype=np.int32))
      fields["ref_logps"].append(np.zeros(n, np.float32))
      margin = np.zeros(n, np.float32)
      if half == 1:
        margin[0] = pair.get("margin", 0.0)
      fields["margin"].append(margin)
    example: dict[str, Any] = {k: np.concatenate(v) for k, v in fields.items()}
    example["index"] = len(out)
    out.append(example)
  if not out:
    raise DataError(f"no preference pair is left after tokenization ({stats.as_dict()}): "
                    "raise PreferenceDataConfig.seq_len, use overlong='truncate_prompt', or "
                    "check that chosen and rejected differ")
  return out, stats


def attach_reference_logps(examples: Sequence[dict[str, Any]], table: np.ndarray
                           ) -> list[dict[str, Any]]:
  """Copies of `examples` carrying reference log-probs.

  Args:
    examples: from `tokenize_pairs`.
    table: float32 `[n_examples, 2]`: row `example["index"]` holds the (chosen, rejected)
      sequence log-prob sums.
  Returns:
    The examples with `ref_logps` set to the sequence's value on the first token of each
    sequence and 0 elsewhere, so a sum over a sequence's tokens gives its value exactly.
  """
  table = np.asarray(table, np.float32)
  n = 1 + max((int(ex["index"]) for ex in examples), default=-1)
  if table.ndim != 2 or table.shape[1] != 2 or table.shape[0] < n:
    raise DataError(f"reference log-prob table has shape {table.shape}; expected "
                    f"[{n}, 2] (chosen, rejected) for the examples' indices")
  if not np.isfinite(table).all():
    raise DataError("reference log-prob table has NaN or Inf entries: the reference pass "
                    "diverged or missed examples; recompute it")
  out = []
  for ex in examples:
    ref = np.zeros(len(ex["half"]), np.float32)
    starts = np.flatnonzero(ex["seq_positions"] == 0)  # the chosen, then the rejected start
    ref[starts] = table[int(ex["index"])]
    out.append({**ex, "ref_logps": ref})
  return out


# ---- Packing and batches ----

def _packable(ex: dict[str, Any]) -> dict[str, np.ndarray]:
  """An example as the packer's per-token fields (its index repeated on every token)."""
  out = {k: ex[k] for k in TOKEN_FIELDS}
  out["pair_index"] = np.full(len(ex["inputs"]), ex["index"], np.int32)
  return out


class _PairRow:
  """A packed row (`inputs_segment_ids` numbering the row's pairs 1..k) in the batch layout.
  A class, not a closure, so grain can pickle it."""

  def __init__(self, max_pairs: int):
    self.max_pairs = max_pairs

  def __call__(self, row: dict[str, np.ndarray]) -> Batch:
    pair_seg = row["inputs_segment_ids"]
    real = pair_seg > 0
    pair_index = np.full(self.max_pairs, -1, np.int32)
    for s in np.unique(pair_seg[real]):
      pair_index[s - 1] = row["pair_index"][np.argmax(pair_seg == s)]
    return {
        "tokens": row["inputs"], "targets": row["targets"],
        "loss_mask": row["loss_mask"] * real,
        "segment_ids": np.where(real, 2 * (pair_seg - 1) + row["half"], 0).astype(np.int32),
        "positions": np.where(real, row["seq_positions"], 0).astype(np.int32),
        "pair_slot": np.where(real, pair_seg - 1, -1).astype(np.int32),
        "chosen": (real & (row["half"] == 1)).astype(np.int32),
        "ref_logps": np.where(real, row["ref_logps"], 0).astype(np.float32),
        "margin": np.where(real, row["margin"], 0).astype(np.float32),
        "pair_index": pair_index,
    }


def pack_pairs(ds: grain.IterDataset, seq_len: int, rows: int, max_pairs: int,
               seed: int = 0, shuffle_bins: bool = True) -> grain.IterDataset:
  """Rows of the batch layout from examples (`tokenize_pairs`): whole pairs first-fit packed,
  at most `max_pairs` to a row; `rows` bins are filled at a time (one batch)."""
  fields = TOKEN_FIELDS + ("pair_index",)
  # Every field but `inputs` is a meta feature: packed and padded (with 0), but without the
  # `{name}_segment_ids` / `{name}_positions` grain would otherwise add for each feature.
  packed = grain.experimental.FirstFitPackIterDataset(
      ds.map(_packable), length_struct={k: seq_len for k in fields}, num_packing_bins=rows,
      seed=seed, shuffle_bins=shuffle_bins, meta_features=fields[1:],
      max_sequences_per_bin=max_pairs)
  return packed.map(_PairRow(max_pairs))


def pad_pair_rows(batch: Batch, rows: int) -> Batch:
  """Pads a short batch with empty rows (`pair_slot` and `pair_index` -1 there)."""
  n = batch["tokens"].shape[0]
  out = pad_rows(batch, rows)
  for k in ("pair_slot", "pair_index"):
    out[k][n:] = -1
  return out


def train_batches(examples: Sequence[dict[str, Any]], cfg: PreferenceDataConfig,
                  process_index: int = 0, process_count: int = 1) -> global_order.GlobalOrder:
  """This process's rows `[batch_size // process_count, seq_len]` (batch layout) of the
  shuffled training batches, forever or `num_epochs`. Every process packs the same global
  batches and keeps its rows: the same batches on any number of processes (`global_order`)."""
  ds = grain.MapDataset.source(list(examples)).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
  batches = pack_pairs(ds.to_iter_dataset(), cfg.seq_len, cfg.batch_size,
                       cfg.max_pairs_per_row, cfg.seed).batch(cfg.batch_size,
                                                              drop_remainder=True)
  return global_order.from_global_batches(batches, cfg.batch_size, process_index,
                                          process_count, "PreferenceDataConfig.batch_size")


def eval_batches(examples: Sequence[dict[str, Any]], cfg: PreferenceDataConfig,
                 process_index: int = 0, process_count: int = 1) -> list[Batch]:
  """This process's rows of at most `eval_batches` fixed held-out batches (a short last one
  padded with empty rows); the same batches on any number of processes."""
  rows = global_order.process_rows(cfg.batch_size, process_index, process_count,
                                   "PreferenceDataConfig.batch_size")
  ds = grain.MapDataset.source(list(examples)).to_iter_dataset()
  out = []
  for batch in pack_pairs(ds, cfg.seq_len, cfg.batch_size, cfg.max_pairs_per_row,
                          shuffle_bins=False).batch(cfg.batch_size):
    out.append({k: v[rows] for k, v in pad_pair_rows(batch, cfg.batch_size).items()})
    if len(out) == cfg.eval_batches:
      break
  return out


def pair_batches_in_order(examples: Sequence[dict[str, Any]], cfg: PreferenceDataConfig,
                          rows: int | None = None) -> Iterator[Batch]:
  """One deterministic pass over every example, each once, in batches of `rows` (default
  `batch_size`) rows, the last padded: for precomputing reference log-probs.

  Examples enter the packer in index order (first-fit may place a later one in an earlier row
  of the same batch); map results back to examples through `pair_index`.
  """
  rows = rows or cfg.batch_size
  ds = grain.MapDataset.source(list(examples)).to_iter_dataset()
  for batch in pack_pairs(ds, cfg.seq_len, rows, cfg.max_pairs_per_row,
                          shuffle_bins=False).batch(rows, drop_remainder=False):
    yield pad_pair_rows(batch, rows)


# ---- Per-pair sums (JAX) ----

def sequence_sums(values: jax.Array, batch: dict[str, Any], max_pairs: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Sums a per-token quantity over each pair's chosen and rejected sequence.

  Args:
    values: `[rows, seq]`, e.g. token logp * loss_mask (log-probs), loss_mask (lengths) or
      ref_logps. Padding tokens are ignored whatever their value (even inf or NaN).
    batch: the batch layout (`pair_slot`, `chosen`, each `[rows, seq]`).
    max_pairs: P, the config's max_pairs_per_row.
  Returns:
    (chosen, rejected) sums, each float `[rows, P]`; 0 for an empty slot.
  """
  slot = jax.nn.one_hot(batch["pair_slot"], max_pairs, dtype=jnp.bool_)  # -1 -> all False
  is_chosen = (jnp.asarray(batch["chosen"]) == 1)[..., None]
  values = jnp.asarray(values)[..., None]
  # where, not multiply: exact (no matmul precision), and padding's inf/NaN never leaks in.
  chosen = jnp.sum(jnp.where(slot & is_chosen, values, 0), axis=1)
  rejected = jnp.sum(jnp.where(slot & ~is_chosen, values, 0), axis=1)
  return chosen, rejected


def pair_valid(batch: dict[str, Any], max_pairs: int) -> jax.Array:
  """`[rows, P]` bool: whether the row's k-th slot holds a pair."""
  return jnp.any(jax.nn.one_hot(batch["pair_slot"], max_pairs, dtype=jnp.bool_), axis=1)
