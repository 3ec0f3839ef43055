"""Chat templates: conversations -> token ids with an exact assistant-token mask.

A conversation is a list of `{"role": "system"|"user"|"assistant", "content": str}`. It is
built segment by segment from token ids (special tokens by id, text encoded piece by piece),
so the mask marks exactly the tokens of each assistant reply plus its end-of-turn token (the
model must learn to stop), and never a template token or a prompt token.

Templates:
  chatml  (Qwen2/2.5): `<|im_start|>{role}\\n{content}<|im_end|>\\n`, reply ends at <|im_end|>.
  llama3  (Llama 3): `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`,
          after bos (Llama 3's <|begin_of_text|>).
Both start with the tokenizer's bos when it has one (llmjax SentencePiece models do, Qwen's
tokenizer does not).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from llmjax.errors import ConfigError, DataError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """One template's pieces: `start + header(role) + content + end + after`."""
  name: str
  start: str  # special token opening a turn
  header_suffix: str  # text between the role and the content
  end: str  # special token closing a turn (the reply's stop token)
  separator_after_end: str  # text after `end`
  header_close: str | None = None  # special token right after the role (Llama 3)
  jinja: str = ""


_CHATML_JINJA = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_LLAMA3_JINJA = (
    "{%- if bos_token %}{{ bos_token }}{% endif %}"
    "{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")

TEMPLATES = {
    "chatml": ChatTemplate("chatml", "<|im_start|>", "\n", "<|im_end|>", "\n",
                           jinja=_CHATML_JINJA),
    "llama3": ChatTemplate("llama3", "<|start_header_id|>", "\n\n", "<|eot_id|>", "",
                           header_close="<|end_header_id|>", jinja=_LLAMA3_JINJA),
}


def get_template(name: str) -> ChatTemplate:
  if name not in TEMPLATES:
    raise ConfigError(f"unknown chat template {name!r}: choose one of {sorted(TEMPLATES)}")
  return TEMPLATES[name]


def chat_template_jinja(name: str) -> str:
  """The template as Hugging Face `tokenizer_config.json` `chat_template` (for export)."""
  return get_template(name).jinja


def stop_token_ids(tokenizer: Any, name: str) -> list[int]:
  """Ids that end an assistant reply: the template's end-of-turn token and eos."""
  ids = [tokenizer.token_id(get_template(name).end)]
  if tokenizer.eos_id is not None and tokenizer.eos_id >= 0:
    ids.append(tokenizer.eos_id)
  return ids


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
  """Checks the shape of a conversation; DataError naming `where` (file:line) otherwise."""
  if not isinstance(messages, list) or not messages:
    raise DataError(f"{where}: 'messages' must be a non-empty list of {{role, content}} "
                    "objects")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, dict) or not isinstance(m.get("content"), str):
      raise DataError(f"{where}: messages[{i}] must be an object with a string 'content'")
    role = m.get("role")
    if role not in ROLES:
      raise DataError(f"{where}: messages[{i}] has role {role!r}; use one of {ROLES}")
    if role == "system" and i != 0:
      raise DataError(f"{where}: messages[{i}] is a system message; only the first message "
                      "may be one")
    out.append({"role": role, "content": m["content"]})
  return out


def render_text(messages: Sequence[dict[str, str]], name: str, bos: str = "",
                add_generation_prompt: bool = False) -> str:
  """The conversation as template text (what the jinja template renders, `bos` first)."""
  t = get_template(name)
  parts = [bos]
  for m in messages:
    parts.append(_turn_text(t, m["role"], m["content"]))
  if add_generation_prompt:
    parts.append(_header_text(t, "assistant"))
  return "".join(parts)


def _header_text(t: ChatTemplate, role: str) -> str:
  return t.start + role + (t.header_close or "") + t.header_suffix


def _turn_text(t: ChatTemplate, role: str, content: str) -> str:
  return _header_text(t, role) + content + t.end + t.separator_after_end


def render_chat(messages: Sequence[dict[str, str]], name: str, tokenizer: Any,
                add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
  """(token ids, assistant mask) of a conversation; mask 1 on reply tokens and their end token.

  With `add_generation_prompt`, the assistant header is appended (the prompt to generate a
  reply from).
  """
  t = get_template(name)
  start, end = tokenizer.token_id(t.start), tokenizer.token_id(t.end)
  close = tokenizer.token_id(t.header_close) if t.header_close else None
  ids: list[int] = []
  mask: list[int] = []

  def add(tokens: list[int], m: int) -> None:
    ids.extend(tokens)
    mask.extend([m] * len(tokens))

  def header(role: str) -> None:
    if close is None:
      add([start] + tokenizer.encode(role + t.header_suffix), 0)
    else:
      add([start] + tokenizer.encode(role) + [close] + tokenizer.encode(t.header_suffix), 0)

  if tokenizer.bos_id is not None and tokenizer.bos_id >= 0:
    add([tokenizer.bos_id], 0)
  for m in messages:
    header(m["role"])
    is_reply = int(m["role"] == "assistant")
    add(tokenizer.encode(m["content"]), is_reply)
    add([end], is_reply)
    if t.separator_after_end:
      add(tokenizer.encode(t.separator_after_end), 0)
  if add_generation_prompt:
    header("assistant")
  return ids, mask


def after_reply(tokenizer: Any, name: str) -> tuple[int, tuple[int, ...]]:
  """(the end-of-turn token id, the ids the template renders right after it): ChatML's
  `<|im_end|>` and `\n`; Llama 3's `<|eot_id|>` and nothing. A reply sampled up to its stop
  token lacks what follows it in the rendered conversation, which is what a reward model
  trained on rendered conversations reads its score at (`stages.ppo.reward_scores`)."""
  t = get_template(name)
  after = tokenizer.encode(t.separator_after_end) if t.separator_after_end else []
  return tokenizer.token_id(t.end), tuple(after)


def prompt_ids(messages: Sequence[dict[str, str]], name: str, tokenizer: Any) -> list[int]:
  """Token ids of the conversation so far plus the assistant header: a generation prompt."""
  return render_chat(messages, name, tokenizer, add_generation_prompt=True)[0]


def masked_spans(ids: Sequence[int], mask: Sequence[int]) -> list[list[int]]:
  """The maximal runs of `ids` where `mask` is 1 (for checking what a loss trains on)."""
  spans, current = [], []
  for i, m in zip(ids, np.asarray(mask).tolist()):
    if m:
      current.append(int(i))
    elif current:
      spans.append(current)
      current = []
  if current:
    spans.append(current)
  return spans
