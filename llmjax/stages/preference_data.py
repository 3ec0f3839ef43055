"""What the preference stages (`rm`, `dpo`) share: their pairs, tokenized with the run's
tokenizer and chat template, and the held-out questions they answer at every evaluation."""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging

from llmjax.data import chat, preferences
from llmjax.model.config import ModelConfig
from llmjax.stages.context import RunContext, TokenizerConfig


@dataclasses.dataclass
class PreferenceSplits:
  tokenizer: Any
  train: list[dict[str, Any]]  # tokenized examples (`preferences.tokenize_pairs`)
  eval: list[dict[str, Any]]
  train_pairs: list[preferences.Pair]  # the training pairs as messages
  eval_pairs: list[preferences.Pair]  # the held-out pairs as messages
  counts: dict[str, int]  # what reading and tokenizing kept, truncated and dropped


def prepare_pairs(ctx: RunContext, stage: str, data: preferences.PreferenceDataConfig,
                  tokenizer_cfg: TokenizerConfig, model_cfg: ModelConfig, template: str,
                  has_start: bool) -> PreferenceSplits:
  """Reads, renders and tokenizes the stage's pairs; counts everything dropped or cut.

  `has_start`: the stage starts from trained parameters, whose tokenizer it must use.
  """
  chat.get_template(template)
  train_pairs, eval_pairs, source_stats = preferences.load_pairs(data)
  texts = [chat.render_text(p["prompt"] + p["chosen"], template) for p in train_pairs]
  tokenizer = ctx.ensure_tokenizer(tokenizer_cfg, texts, model_cfg, stage, has_start)
  chat.stop_token_ids(tokenizer, template)  # ConfigError if it lacks the template's tokens
  train, train_stats = preferences.tokenize_pairs(train_pairs, tokenizer, template,
                                                  data.seq_len, data.overlong)
  evals, eval_stats = preferences.tokenize_pairs(eval_pairs, tokenizer, template,
                                                 data.seq_len, data.overlong)
  counts = {**source_stats.as_dict(), **train_stats.as_dict("train_"),
            **eval_stats.as_dict("eval_")}
  logging.info("%s data (%s, overlong=%s): %s", stage, template, data.overlong, counts)
  return PreferenceSplits(tokenizer, train, evals, train_pairs, eval_pairs, counts)


def answer_items(pairs: list[preferences.Pair], limit: int) -> list[dict[str, Any]]:
  """`{messages, answer, rejected}` of held-out pairs whose completions are single replies:
  the questions a greedy answer is checked against (exact match, or the rejected answer)."""
  items = []
  for p in pairs:
    if len(p["chosen"]) == 1 and len(p["rejected"]) == 1:
      items.append({"messages": p["prompt"], "answer": p["chosen"][0]["content"],
                    "rejected": p["rejected"][0]["content"]})
  return items[:limit]
