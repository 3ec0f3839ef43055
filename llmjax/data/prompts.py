"""Prompt data for RL stages: prompts with a verifiable numeric reference answer (GRPO), or
prompts with an optional reference reply (PPO, where a reward model judges).

Sources, all normalised to items `{"messages": [messages], "answer": float | str | None,
"question": str}` (messages are `{role, content}`, see `llmjax.data.chat`; `question` is the
last user message's text, for logs and reward functions). Numeric answers (`NUMERIC_FORMATS`):
  * 'builtin': the synthetic world's multi-step word problems (`synthetic.reasoning_problems`)
    with a held-out eval split (eval-only phrasings and operand combinations);
  * 'gsm8k': GSM8K JSONL, `{"question": str, "answer": str}` where the answer's worked
    solution ends in `#### N`: the reference is N (commas removed);
  * 'jsonl': `{"prompt": str or [messages], "answer": str or number}`; a string prompt is one
    user message, a list must end with a user message; a string answer is a number
    (`1,200`, `-3`, `2.5`) or ends in `#### N`.
Text answers:
  * 'builtin_questions': the synthetic world's questions of the built-in preference pairs
    (what the built-in reward model judges); the answer is the true reply's text and
    `rejected` the plausible wrong one, for exact-match evals;
  * 'prompt_only': `{"prompt": str or [messages]}` (TRL's prompt-only form), with an optional
    string `answer` (the reply an exact-match eval expects).
A line whose reference answer has no parsable number is counted and dropped, and a warning
names the first few `file:line`s (a DataError when no line is usable). Malformed lines (bad
JSON, missing or mistyped fields) are DataErrors naming `file:line` unless `skip_bad_lines`.

Prompts are tokenized up front with a chat template (`chat.prompt_ids`: they end with the
assistant header, ready to sample a reply from), an optional system prompt first. A prompt
longer than `max_prompt_tokens` is truncated from the left (the question at its end is what
the reply answers; bos and the system turn are kept) or dropped, and counted either way.

`PromptIterator` yields this process's share of each step's prompts, shuffled per epoch and
checkpointable (`get_state`/`set_state` bytes, as `llmjax.train.loop.BatchSource` saves).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any, Sequence

import gin
import grain
from absl import logging

from llmjax.data import chat, synthetic
from llmjax.data.pipeline import as_paths
from llmjax.data.sources import hold_out, read_jsonl_records
from llmjax.errors import ConfigError, DataError

NUMERIC_FORMATS = ("builtin", "gsm8k", "jsonl")
FORMATS = NUMERIC_FORMATS + ("builtin_questions", "prompt_only")
OVERLONG_RULES = ("truncate", "drop")
_SHOWN_PROBLEMS = 3  # unparsable answers named in the warning

Messages = list[dict[str, str]]
Item = dict[str, Any]
Example = dict[str, Any]


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptDataConfig:
  """Where an RL stage's prompts come from and how they are served.

  Attributes:
    format: 'builtin' (the synthetic world's word problems), 'gsm8k' or 'jsonl' (numeric
      answers); 'builtin_questions' or 'prompt_only' (text answers, optional in the latter).
      See the module doc for the line forms.
    train_paths, eval_paths: JSONL files or globs; with no eval_paths, `eval_examples`
      prompts of the training files are held out (a fixed selection, whatever the seed).
    system_prompt: rendered as a system message before every prompt that has none of its
      own; None for no system message.
    max_prompt_tokens: the longest rendered prompt (bos, system turn, messages and the
      assistant header); longer ones follow `overlong`.
    overlong: 'truncate' (keep bos and the system turn, then the prompt's end, where the
      question is) or 'drop'. Both are counted.
    prompts_per_step: B, the prompts of one step summed over processes (each is sampled
      G times by the stage); divisible by the process count.
    builtin_train, builtin_eval: sizes of the built-in problem (or question) sets.
    eval_examples: held-out prompts when there are no eval_paths (gsm8k, jsonl).
    eval_prompts: how many held-out prompts an evaluation uses (all processes together).
    seed: shuffling seed (each epoch reshuffles). num_epochs: None repeats forever.
    skip_bad_lines: count and skip malformed JSONL lines instead of failing.
  """
  format: str = "builtin"
  train_paths: tuple[str, ...] = ()
  eval_paths: tuple[str, ...] = ()
  system_prompt: str | None = None
  max_prompt_tokens: int = 128
  overlong: str = "truncate"
  prompts_per_step: int = 16
  builtin_train: int = 2000
  builtin_eval: int = 300
  eval_examples: int = 200
  eval_prompts: int = 128
  seed: int = 0
  num_epochs: int | None = None
  skip_bad_lines: bool = False

  def __post_init__(self):
    for name in ("train_paths", "eval_paths"):
      object.__setattr__(self, name, as_paths(getattr(self, name)))
    name = "PromptDataConfig"
    if self.format not in FORMATS:
      raise ConfigError(f"{name}.format={self.format!r}: use one of {FORMATS}")
    if self.overlong not in OVERLONG_RULES:
      raise ConfigError(f"{name}.overlong={self.overlong!r}: use one of {OVERLONG_RULES}")
    if self.system_prompt is not None and not isinstance(self.system_prompt, str):
      raise ConfigError(f"{name}.system_prompt must be a string or None, got "
                        f"{type(self.system_prompt).__name__}")
    if self.max_prompt_tokens < 8:
      raise ConfigError(f"{name}.max_prompt_tokens={self.max_prompt_tokens}: use at least 8 "
                        "(a template's headers alone take several tokens)")
    for key in ("prompts_per_step", "builtin_train", "builtin_eval", "eval_examples",
                "eval_prompts"):
      if getattr(self, key) < 1:
        raise ConfigError(f"{name}.{key}={getattr(self, key)}: must be positive")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ConfigError(f"{name}.num_epochs={self.num_epochs}: use None (repeat forever) or "
                        "a positive number")
    if not self.format.startswith("builtin") and not self.train_paths:
      raise ConfigError(f"{name}.train_paths is empty: give JSONL files for "
                        f"format={self.format!r}")


@dataclasses.dataclass
class PromptStats:
  """What reading and tokenizing did. Sources fill `unparsable_answers` and `skipped_lines`,
  `tokenize_prompts` the rest; `+` adds two up (e.g. train and eval)."""
  examples: int = 0  # prompts tokenized (before dropping)
  truncated: int = 0
  dropped_overlong: int = 0  # overlong under 'drop'
  unparsable_answers: int = 0  # lines whose reference has no number (dropped)
  skipped_lines: int = 0  # malformed lines under skip_bad_lines

  def __add__(self, other: "PromptStats") -> "PromptStats":
    return PromptStats(*(a + b for a, b in zip(dataclasses.astuple(self),
                                               dataclasses.astuple(other))))

  def as_dict(self, prefix: str = "") -> dict[str, int]:
    return {prefix + k: v for k, v in dataclasses.asdict(self).items()}


# ---- Reference answers ----

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")


def _reference_number(text: str) -> float | None:
  """The number a reference answer states: after the last `####` if there is one, else the
  whole text; commas, a leading `$` and a final period are ignored. None if not a number.

  Deliberately strict (a reference, not a model's completion): '#### 1,200' -> 1200.0,
  '-3' -> -3.0, '2.5' -> 2.5, 'about 7' -> None.
  """
  if "####" in text:
    text = text.rsplit("####", 1)[1]
  text = text.strip().replace(",", "").rstrip(".").strip().lstrip("$")
  if not _PLAIN_NUMBER.fullmatch(text):
    return None
  return float(text)


# ---- Sources ----

def _gsm8k_item(record: dict[str, Any], where: str) -> tuple[Item, str]:
  """(item without its answer, the raw reference text) of a GSM8K record."""
  for key in ("question", "answer"):
    if not isinstance(record.get(key), str):
      raise DataError(f"{where}: GSM8K lines need string 'question' and 'answer' fields "
                      f"(the answer ending in '#### N'); '{key}' is "
                      f"{'missing' if key not in record else type(record[key]).__name__}")
  question = record["question"]
  item = {"messages": [{"role": "user", "content": question}], "question": question}
  return item, record["answer"]


def _generic_item(record: dict[str, Any], where: str) -> tuple[Item, str | float]:
  """(item without its answer, the raw reference) of a `{prompt, answer}` record."""
  missing = [k for k in ("prompt", "answer") if k not in record]
  if missing:
    raise DataError(f"{where}: missing {missing}: a prompt line needs 'prompt' (a string or "
                    f"a list of messages) and 'answer'; keys are {sorted(record)[:8]}")
  prompt, answer = record["prompt"], record["answer"]
  if isinstance(prompt, str):
    messages = [{"role": "user", "content": prompt}]
  elif isinstance(prompt, list):
    messages = chat.validate_messages(prompt, f"{where}: 'prompt'")
    if messages[-1]["role"] != "user":
      raise DataError(f"{where}: 'prompt' ends with a {messages[-1]['role']} message; it "
                      "must end with the user message the reply answers")
  else:
    raise DataError(f"{where}: 'prompt' must be a string or a list of {{role, content}} "
                    f"messages, got {type(prompt).__name__}")
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    raise DataError(f"{where}: 'answer' must be a string or a number, got "
                    f"{type(answer).__name__}")
  question = next(m["content"] for m in reversed(messages) if m["role"] == "user")
  return {"messages": messages, "question": question}, answer


def _prompt_only_item(record: dict[str, Any], where: str) -> tuple[Item, str | None]:
  """(item, its optional text answer) of a `{prompt[, answer]}` record."""
  answer = record.get("answer")
  if answer is not None and not isinstance(answer, str):
    raise DataError(f"{where}: 'answer' must be a string (the expected reply) when given, got "
                    f"{type(answer).__name__}")
  item, _ = _generic_item({"answer": "", **record}, where)
  return item, answer


def read_jsonl(paths: Sequence[str] | str, fmt: str, skip_bad_lines: bool = False
               ) -> tuple[list[Item], PromptStats]:
  """(items, stats) of GSM8K (`fmt='gsm8k'`) or `{prompt, answer}` (`'jsonl'`) files.

  Malformed lines are DataErrors naming `file:line` unless `skip_bad_lines` (counted);
  lines whose reference answer has no number are counted, dropped and named in a warning.
  """
  if fmt not in ("gsm8k", "jsonl", "prompt_only"):
    raise ConfigError(f"prompt JSONL format {fmt!r}: use 'gsm8k', 'jsonl' or 'prompt_only'")
  parse = {"gsm8k": _gsm8k_item, "jsonl": _generic_item, "prompt_only": _prompt_only_item}[fmt]
  items: list[Item] = []
  stats = PromptStats()
  unparsable: list[str] = []

  def parse_object(record: Any, where: str):
    if not isinstance(record, dict):
      raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return parse(record, where)
  records, stats.skipped_lines = read_jsonl_records(
      paths, parse_object, config="PromptDataConfig", skip_bad_lines=skip_bad_lines)
  for where, (item, raw) in records:
    if fmt == "prompt_only":
      items.append({**item, "answer": raw})
      continue
    if isinstance(raw, str):
      answer = _reference_number(raw)
    else:
      answer = float(raw) if math.isfinite(raw) else None
    if answer is None:
      stats.unparsable_answers += 1
      unparsable.append(where)
      continue
    items.append({**item, "answer": answer})
  if unparsable:
    hint = ("end the answer with '#### N'" if fmt == "gsm8k" else
            "give a number, or text ending in '#### N'")
    shown = ", ".join(unparsable[:_SHOWN_PROBLEMS])
    if not items:
      raise DataError(f"{paths}: no reference answer is a number (e.g. {shown}): {hint}")
    logging.warning("dropped %d prompt(s) whose reference answer has no number (%s%s): %s",
                    len(unparsable), shown, ", ..." if len(unparsable) > _SHOWN_PROBLEMS
                    else "", hint)
  if not items:
    raise DataError(f"{paths}: no prompts found: the files are empty or every line was "
                    f"skipped ({stats.as_dict()})")
  return items, stats


def builtin_items(split: str, num: int | None = None, seed: int = 0) -> list[Item]:
  """The synthetic world's word problems as items (integer answers as floats)."""
  return [{"messages": [{"role": "user", "content": p["question"]}],
           "question": p["question"], "answer": float(p["answer"])}
          for p in synthetic.reasoning_problems(split, num, seed)]


def builtin_question_items(split: str, num: int, seed: int = 0) -> list[Item]:
  """The built-in preference pairs' questions as items, the true reply as the answer."""
  return [{"messages": [{"role": "user", "content": p["prompt"]}], "question": p["prompt"],
           "answer": str(p["chosen"]), "rejected": str(p["rejected"])}
          for p in synthetic.preference_pairs(split, num, seed)]


def load_prompts(cfg: PromptDataConfig) -> tuple[list[Item], list[Item], PromptStats]:
  """(train, eval, stats) items for `cfg`; stats cover both splits' sources."""
  if cfg.format == "builtin":
    return (builtin_items("train", cfg.builtin_train, cfg.seed),
            builtin_items("eval", cfg.builtin_eval), PromptStats())
  if cfg.format == "builtin_questions":
    return (builtin_question_items("train", cfg.builtin_train, cfg.seed),
            builtin_question_items("eval", cfg.builtin_eval), PromptStats())
  train, stats = read_jsonl(list(cfg.train_paths), cfg.format, cfg.skip_bad_lines)
  if cfg.eval_paths:
    evals, more = read_jsonl(list(cfg.eval_paths), cfg.format, cfg.skip_bad_lines)
    return train, evals, stats + more
  train, held = hold_out(train, cfg.eval_examples, "PromptDataConfig")
  return train, held, stats


# ---- Tokenization ----

def with_system_prompt(messages: Messages, system_prompt: str | None) -> Messages:
  """`messages` with `system_prompt` first, unless it is None/empty or they have their own."""
  if not system_prompt or (messages and messages[0]["role"] == "system"):
    return list(messages)
  return [{"role": "system", "content": system_prompt}] + list(messages)


def tokenize_prompts(items: Sequence[Item], tokenizer: Any, template: str,
                     cfg: PromptDataConfig) -> tuple[list[Example], PromptStats]:
  """Tokenized prompts and what fitting them into `max_prompt_tokens` did.

  Each example is `{"index": int (its position in the returned list), "prompt_ids":
  list[int] (at most max_prompt_tokens; ends with the assistant header), "answer": float, str
  or None, "question": str}` (and the item's `rejected` reply, if it has one). Under 'truncate' the kept prefix is bos and the system turn, unless the
  system turn alone takes more than half the budget (then only bos).
  """
  stats = PromptStats()
  out: list[Example] = []
  budget = cfg.max_prompt_tokens
  for item in items:
    stats.examples += 1
    messages = with_system_prompt(item["messages"], cfg.system_prompt)
    ids = chat.prompt_ids(messages, template, tokenizer)
    if len(ids) > budget:
      if cfg.overlong == "drop":
        stats.dropped_overlong += 1
        continue
      # Templates are rendered turn by turn, so bos + the system turn is a prefix of `ids`.
      lead = 1 if tokenizer.bos_id is not None and tokenizer.bos_id >= 0 else 0
      if messages[0]["role"] == "system":
        system_len = len(chat.render_chat(messages[:1], template, tokenizer)[0])
        if system_len <= budget // 2:
          lead = system_len
      ids = ids[:lead] + ids[len(ids) - (budget - lead):]
      stats.truncated += 1
    answer = item["answer"]
    out.append({"index": len(out), "prompt_ids": [int(i) for i in ids],
                "answer": float(answer) if isinstance(answer, (int, float)) else answer,
                "question": item["question"],
                **({"rejected": item["rejected"]} if "rejected" in item else {})})
  if not out:
    raise DataError(f"no prompt is left after tokenization ({stats.as_dict()}): raise "
                    "PromptDataConfig.max_prompt_tokens or use overlong='truncate'")
  return out, stats


def prompt_data(cfg: PromptDataConfig, tokenizer: Any, template: str
                ) -> tuple[list[Example], list[Example], PromptStats]:
  """(train, eval) tokenized examples for `cfg` and the stats of both, logged."""
  train_items, eval_items, stats = load_prompts(cfg)
  train, train_stats = tokenize_prompts(train_items, tokenizer, template, cfg)
  evals, eval_stats = tokenize_prompts(eval_items, tokenizer, template, cfg)
  stats = stats + train_stats + eval_stats
  logging.info("prompt data: %d train, %d eval prompts; %s", len(train), len(evals),
               stats.as_dict())
  if stats.truncated or stats.dropped_overlong:
    logging.warning("%d prompt(s) truncated and %d dropped as longer than "
                    "PromptDataConfig.max_prompt_tokens=%d", stats.truncated,
                    stats.dropped_overlong, cfg.max_prompt_tokens)
  return train, evals, stats


# ---- Serving ----

def _rows(cfg: PromptDataConfig, process_count: int) -> int:
  if cfg.prompts_per_step % process_count:
    raise ConfigError(f"PromptDataConfig.prompts_per_step={cfg.prompts_per_step} must be "
                      f"divisible by the number of processes ({process_count})")
  return cfg.prompts_per_step // process_count


class PromptIterator:
  """This process's prompt groups: each `next()` is a list of `prompts_per_step //
  process_count` examples (see `tokenize_prompts`).

  Process p reads examples p, p + n, ... (disjoint across processes), shuffled with
  `cfg.seed` and reshuffled every epoch, for `num_epochs` (the last partial group dropped)
  or forever. A grain pipeline underneath; `get_state()` / `set_state()` (bytes) resume it
  exactly.
  """

  def __init__(self, examples: Sequence[Example], cfg: PromptDataConfig,
               process_index: int = 0, process_count: int = 1):
    rows = _rows(cfg, process_count)
    ds = grain.MapDataset.source(list(examples))[process_index::process_count]
    if not len(ds):
      raise DataError(f"{len(examples)} prompts are too few to give each of "
                      f"{process_count} processes one: add prompts")
    ds = ds.shuffle(seed=cfg.seed).repeat(cfg.num_epochs).to_iter_dataset()
    # batch_fn=list keeps the examples python objects (ragged prompt ids), not stacked arrays.
    self._iter = ds.batch(rows, drop_remainder=True, batch_fn=list).__iter__()

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> list[Example]:
    return next(self._iter)

  def get_state(self) -> bytes:
    """The position, as bytes to store with a checkpoint."""
    return json.dumps(self._iter.get_state(), sort_keys=True).encode()

  def set_state(self, state: bytes) -> None:
    """Restores a position from `get_state()` (of an iterator over the same examples and
    config)."""
    try:
      self._iter.set_state(json.loads(state))
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f"prompt iterator state does not fit this data ({e}): resume with the "
                      "PromptDataConfig the checkpoint was written with") from None


def eval_prompts(examples: Sequence[Example], cfg: PromptDataConfig,
                 process_index: int = 0, process_count: int = 1) -> list[Example]:
  """This process's share of the fixed held-out prompts: the first `eval_prompts` examples
  (fewer if there are fewer, rounded down to a multiple of the process count, so every
  process gets as many), strided across processes."""
  n = min(cfg.eval_prompts, len(examples))
  n -= n % process_count
  if n == 0:
    raise ConfigError(f"{len(examples)} held-out prompts are too few for {process_count} "
                      "processes: add eval prompts")
  return list(examples[:n][process_index::process_count])
