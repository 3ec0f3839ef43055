"""Instruction data for SFT: sources, tokenization with truncation rules, packing.

Sources give conversations (lists of `{role, content}`):
  * JSONL, one example per line, either Alpaca form `{"instruction", "input"?, "output"}` or
    chat form `{"messages": [{"role", "content"}, ...]}` (multi-turn, optional system first);
  * 'builtin': questions about the synthetic world's people and arithmetic
    (`synthetic.qa_pairs`), some as two-turn conversations, some with a system prompt;
    optionally mixed with multi-step word problems answered by a worked solution ending in
    `#### N` (`synthetic.reasoning_problems`, `SFTDataConfig.builtin_reasoning`), which
    teaches the answer format an RL stage then rewards.

Examples are tokenized up front with a chat template (`llmjax.data.chat`), so every truncated
or dropped example is counted before training starts. They are then packed whole (first-fit,
never split across rows) into the batch layout of `llmjax.data.pipeline`, with `loss_mask`
set only on assistant tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin
import grain
import numpy as np

from llmjax.data import chat, global_order, synthetic
from llmjax.data.pipeline import as_paths, pad_rows, rename_packed
from llmjax.data.sources import hold_out, read_jsonl_records
from llmjax.errors import ConfigError, DataError

OVERLONG_RULES = ("truncate_prompt", "truncate_end", "drop")
FORMATS = ("builtin", "jsonl")
BUILTIN_SYSTEM = "Answer with just the answer."


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SFTDataConfig:
  """Where the instruction data comes from and how it becomes batches.

  Attributes:
    format: 'builtin' (the synthetic world's questions) or 'jsonl' (Alpaca or chat form).
    train_paths, eval_paths: JSONL files or globs; with no eval_paths, `eval_examples`
      examples of the training files are held out (a fixed selection).
    seq_len: tokens per packed row; an example longer than seq_len + 1 tokens is overlong.
    batch_size: rows per optimizer step.
    overlong: 'truncate_prompt' (drop the oldest context, keep the last reply; cut the
      reply's end only if it alone does not fit), 'truncate_end' (keep the beginning) or
      'drop'. Truncated and dropped examples are counted and logged.
    skip_bad_lines: count and skip malformed JSONL lines instead of failing.
    builtin_train, builtin_eval: sizes of the built-in instruction sets.
    builtin_reasoning: how many word-problem conversations (question -> worked solution
      ending in `#### N`) the 'builtin' format adds to its training set; the eval set is
      unchanged. 0 (the default) adds none.
    eval_examples: held-out examples when there are no eval_paths (jsonl).
    eval_batches: packed batches per loss evaluation.
    seed: shuffling seed. num_epochs: None repeats forever.
  """
  format: str = "builtin"
  train_paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()
  seq_len: int = 256
  batch_size: int = 16
  overlong: str = "truncate_prompt"
  skip_bad_lines: bool = False
  builtin_train: int = 2000
  builtin_eval: int = 300
  builtin_reasoning: int = 0
  eval_examples: int = 200
  eval_batches: int = 4
  seed: int = 0
  num_epochs: int | None = None

  def __post_init__(self):
    for name in ("train_paths", "eval_paths"):
      object.__setattr__(self, name, as_paths(getattr(self, name)))
    if self.format not in FORMATS:
      raise ConfigError(f"SFTDataConfig.format={self.format!r}: use one of {FORMATS}")
    if self.builtin_reasoning < 0:
      raise ConfigError(f"SFTDataConfig.builtin_reasoning={self.builtin_reasoning}: use 0 "
                        "(no word problems) or a positive count")
    if self.builtin_reasoning and self.format != "builtin":
      raise ConfigError(f"SFTDataConfig.builtin_reasoning={self.builtin_reasoning} only "
                        f"applies to format='builtin' (format is {self.format!r}): set it "
                        "to 0, or add the problems to your JSONL")
    if self.overlong not in OVERLONG_RULES:
      raise ConfigError(f"SFTDataConfig.overlong={self.overlong!r}: use one of "
                        f"{OVERLONG_RULES}")
    if self.seq_len < 8 or self.batch_size < 1:
      raise ConfigError(f"SFTDataConfig needs seq_len >= 8 and batch_size >= 1, got "
                        f"seq_len={self.seq_len}, batch_size={self.batch_size}")


# ---- Sources ----

def _to_messages(record: Any, where: str) -> list[dict[str, str]]:
  if not isinstance(record, dict):
    raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
  if "messages" in record:
    return chat.validate_messages(record["messages"], where)
  if "instruction" in record and "output" in record:
    fields = {k: record.get(k, "") for k in ("instruction", "input", "output")}
    bad = [k for k, v in fields.items() if not isinstance(v, str)]
    if bad:
      raise DataError(f"{where}: Alpaca field(s) {bad} must be strings")
    prompt = fields["instruction"] + (f"\n\n{fields['input']}" if fields["input"] else "")
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": fields["output"]}]
  raise DataError(f"{where}: neither chat form ('messages') nor Alpaca form ('instruction' "
                  f"and 'output'); keys are {sorted(record)[:8]}")


def read_jsonl(paths: Sequence[str] | str, skip_bad_lines: bool = False
               ) -> tuple[list[list[dict[str, str]]], int]:
  """(conversations, skipped line count) of JSONL files in Alpaca or chat form.

  A malformed line is a DataError naming `file:line`, unless `skip_bad_lines` (then counted).
  Blank lines are ignored.
  """
  records, skipped = read_jsonl_records(paths, _to_messages, config="SFTDataConfig",
                                       skip_bad_lines=skip_bad_lines)
  conversations = [conv for _, conv in records]
  if not conversations:
    raise DataError(f"{paths}: no examples found: the files are empty or every line was "
                    "skipped")
  return conversations, skipped


def builtin_conversations(split: str, num: int, seed: int = 0) -> list[list[dict[str, str]]]:
  """The synthetic world's questions as conversations; each reply is the bare answer.

  'train' mixes single questions (75%) and two-question conversations, a fifth of them with a
  system prompt; 'eval' (held-out phrasings and arithmetic) is single questions only, the last
  message being the reference answer.
  """
  pairs = synthetic.qa_pairs(split, num, seed)
  if split == "eval":
    return [[{"role": "user", "content": p["question"]},
             {"role": "assistant", "content": p["answer"]}] for p in pairs]
  rng = np.random.default_rng([seed, 77])
  out, i = [], 0
  while i < len(pairs):
    turns = 2 if rng.random() < 0.25 and i + 1 < len(pairs) else 1
    conv = [{"role": "system", "content": BUILTIN_SYSTEM}] if rng.random() < 0.2 else []
    for p in pairs[i:i + turns]:
      conv += [{"role": "user", "content": p["question"]},
               {"role": "assistant", "content": p["answer"]}]
    out.append(conv)
    i += turns
  return out


def reasoning_conversations(split: str, num: int | None = None,
                            seed: int = 0) -> list[list[dict[str, str]]]:
  """Word problems (`synthetic.reasoning_problems`) as single-turn conversations: the user
  asks the question, the assistant replies with the worked solution ending in `#### N`."""
  return [[{"role": "user", "content": p["question"]},
           {"role": "assistant", "content": p["solution"]}]
          for p in synthetic.reasoning_problems(split, num, seed)]


def conversations(cfg: SFTDataConfig) -> tuple[list, list, int]:
  """(train, eval, skipped lines) conversations for `cfg`."""
  if cfg.format == "builtin":
    train = builtin_conversations("train", cfg.builtin_train, cfg.seed)
    if cfg.builtin_reasoning:
      # Appended, not interleaved: the training stream shuffles every epoch anyway.
      train += reasoning_conversations("train", cfg.builtin_reasoning, cfg.seed)
    return train, builtin_conversations("eval", cfg.builtin_eval), 0
  train, skipped = read_jsonl(list(cfg.train_paths), cfg.skip_bad_lines)
  if cfg.eval_paths:
    evals, more = read_jsonl(list(cfg.eval_paths), cfg.skip_bad_lines)
    return train, evals, skipped + more
  train, held = hold_out(train, cfg.eval_examples, "SFTDataConfig")
  return train, held, skipped


# ---- Tokenization and truncation ----

@dataclasses.dataclass
class TokenizeStats:
  examples: int = 0
  truncated: int = 0
  dropped_overlong: int = 0
  dropped_no_reply: int = 0  # nothing left to train on (no assistant turn, or cut away)

  def as_dict(self, prefix: str = "") -> dict[str, int]:
    return {prefix + k: v for k, v in dataclasses.asdict(self).items()}


def truncate(ids: list[int], mask: list[int], max_len: int, rule: str,
             bos_id: int | None) -> tuple[list[int], list[int]] | None:
  """Fits one example into `max_len` tokens by `rule` (see SFTDataConfig); None = drop."""
  if len(ids) <= max_len:
    return ids, mask
  if rule == "drop":
    return None
  if rule == "truncate_end":
    return ids[:max_len], mask[:max_len]
  # truncate_prompt: the last reply starts after the last 0 -> 1 transition of the mask.
  starts = [i for i in range(1, len(mask)) if mask[i] and not mask[i - 1]]
  if not starts:
    return ids[:max_len], mask[:max_len]
  r = starts[-1]
  keep_bos = bos_id is not None and bos_id >= 0 and ids[0] == bos_id
  lead = 1 if keep_bos else 0
  # The reply keeps at most the budget minus a quarter for its prompt (or all the prompt has).
  reply_budget = max_len - lead - min(r - lead, max(1, max_len // 4))
  tail_ids, tail_mask = ids[r:r + reply_budget], mask[r:r + reply_budget]
  cut = max(lead, r - (max_len - lead - len(tail_ids)))  # keep the most recent context
  return (ids[:lead] + ids[cut:r] + tail_ids, mask[:lead] + mask[cut:r] + tail_mask)


def tokenize_conversations(convs: Sequence[list[dict[str, str]]], tokenizer: Any,
                           template: str, seq_len: int, overlong: str
                           ) -> tuple[list[dict[str, np.ndarray]], TokenizeStats]:
  """Examples `{inputs, targets, loss_mask}` (each `[len - 1]`) and what truncation did.

  `loss_mask[i]` is 1 when `targets[i]` is an assistant token (reply or its end token).
  """
  stats = TokenizeStats()
  out = []
  for conv in convs:
    stats.examples += 1
    ids, mask = chat.render_chat(conv, template, tokenizer)
    fitted = truncate(ids, mask, seq_len + 1, overlong, tokenizer.bos_id)
    if fitted is None:
      stats.dropped_overlong += 1
      continue
    if len(fitted[0]) < len(ids):
      stats.truncated += 1
    ids, mask = fitted
    if not any(mask[1:]):
      stats.dropped_no_reply += 1
      continue
    ids = np.asarray(ids, np.int32)
    out.append({"inputs": ids[:-1], "targets": ids[1:],
                "loss_mask": np.asarray(mask[1:], np.int32)})
  if not out:
    raise DataError(f"no SFT example is left after tokenization ({stats.as_dict()}): raise "
                    "SFTDataConfig.seq_len or check that the data has assistant replies")
  return out, stats


# ---- Packing ----


def tokenize_splits(train: Sequence[Any], evals: Sequence[Any], skipped: int, tokenizer: Any,
                    template: str, cfg: "SFTDataConfig") -> tuple[list, list, dict[str, int]]:
  """(train examples, eval examples, counts) of `conversations()`'s splits, rendered with
  `template` and fitted to `cfg.seq_len` by `cfg.overlong`: what every SFT-data stage does."""
  train_ex, train_stats = tokenize_conversations(train, tokenizer, template, cfg.seq_len,
                                                 cfg.overlong)
  eval_ex, eval_stats = tokenize_conversations(evals, tokenizer, template, cfg.seq_len,
                                               cfg.overlong)
  counts = {**train_stats.as_dict("train_"), **eval_stats.as_dict("eval_"),
            "skipped_lines": skipped}
  return train_ex, eval_ex, counts

def pack_examples(ds: grain.IterDataset, seq_len: int, rows: int,
                  seed: int = 0) -> grain.IterDataset:
  """First-fit packs whole examples into `seq_len` rows (padding instead of splitting).

  `rows` bins are filled at a time, so a batch of `rows` rows is one packing round.
  """
  lengths = {"inputs": seq_len, "targets": seq_len, "loss_mask": seq_len}
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=rows, seed=seed, shuffle_bins=True)
  return packed.map(rename_packed)


def train_batches(examples: list[dict[str, np.ndarray]], cfg: SFTDataConfig,
                  process_index: int = 0, process_count: int = 1) -> global_order.GlobalOrder:
  """This process's rows `[batch_size // processes, seq_len]` of the packed training batches.

  Every process packs the same global batches (`batch_size` first-fit bins at a time) and
  keeps its rows, so the batches are the same on any number of processes (`global_order`).
  """
  ds = grain.MapDataset.source(examples).shuffle(seed=cfg.seed).repeat(cfg.num_epochs)
  batches = pack_examples(ds.to_iter_dataset(), cfg.seq_len, cfg.batch_size,
                          cfg.seed).batch(cfg.batch_size, drop_remainder=True)
  return global_order.from_global_batches(batches, cfg.batch_size, process_index,
                                          process_count, "SFTDataConfig.batch_size")


def eval_batches(examples: list[dict[str, np.ndarray]], cfg: SFTDataConfig,
                 process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """This process's rows of the fixed held-out packed batches (a short last batch padded
  with empty rows); the same batches on any number of processes."""
  rows = global_order.process_rows(cfg.batch_size, process_index, process_count,
                                   "SFTDataConfig.batch_size")
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  out = []
  for batch in pack_examples(ds, cfg.seq_len, cfg.batch_size).batch(cfg.batch_size):
    out.append({k: v[rows] for k, v in pad_rows(batch, cfg.batch_size).items()})
    if len(out) == cfg.eval_batches:
      break
  return out


# ---- Exact-match items ----

def reference_items(convs: Sequence[list[dict[str, str]]]) -> list[dict[str, Any]]:
  """`{messages, answer}` for each conversation ending in an assistant reply: the prompt is
  everything before the reply, the answer its text."""
  return [{"messages": c[:-1], "answer": c[-1]["content"]}
          for c in convs if len(c) >= 2 and c[-1]["role"] == "assistant"]


def normalize_answer(text: str) -> str:
  """Case, surrounding space and a final period do not count against an exact match."""
  return text.strip().rstrip(".").strip().lower()
