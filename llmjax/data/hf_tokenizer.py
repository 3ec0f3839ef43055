"""Hugging Face `tokenizer.json` tokenizers behind the interface of `llmjax` `Tokenizer`.

Used for imported models whose tokenizer is not SentencePiece (Llama-3, Qwen2: byte-level
BPE). Needs the `tokenizers` package (not transformers). The special tokens come from the
`tokenizer_config.json` / `special_tokens_map.json` next to `tokenizer.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

from llmjax.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from llmjax.errors import ConfigError, DataError

_ROLES = ("pad", "bos", "eos", "unk")


def _token_content(value: Any) -> str | None:
  """A special token entry of tokenizer_config.json: a string or an AddedToken dict."""
  if isinstance(value, dict):
    return value.get("content")
  return value if isinstance(value, str) else None


def _read_special_tokens(directory: str) -> dict[str, str]:
  """{'bos': '<s>', ...} from tokenizer_config.json, falling back to special_tokens_map.json."""
  found: dict[str, str] = {}
  for name in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
      continue
    try:
      with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise DataError(f"{path}: not valid JSON ({e}); fix or delete it") from None
    for role in _ROLES:
      content = _token_content(cfg.get(f"{role}_token"))
      if content is not None:
        found.setdefault(role, content)
  return found


class HFTokenizer:
  """A `tokenizers.Tokenizer` with fixed special ids. Picklable (as its JSON).

  Absent special tokens have id -1, as in SentencePiece models that disable them.
  """

  def __init__(self, tokenizer_json: str, special_tokens: dict[str, str],
               path: str | None = None):
    try:
      from tokenizers import Tokenizer as _Tok
    except ImportError:
      raise ConfigError("reading a tokenizer.json needs the tokenizers package: pip install "
                        "tokenizers") from None
    self._json = tokenizer_json
    self._special = dict(special_tokens)
    self._path = path
    try:
      self._tok = _Tok.from_str(tokenizer_json)
    except Exception as e:  # tokenizers raises its own Exception subclass
      raise DataError(f"{path or 'tokenizer.json'}: not a tokenizers JSON file ({e})") from None
    self._ids = {}
    for role in _ROLES:
      piece = self._special.get(role)
      i = self._tok.token_to_id(piece) if piece is not None else None
      self._ids[role] = -1 if i is None else i

  @classmethod
  def load(cls, path: str) -> "HFTokenizer":
    """Loads `tokenizer.json` and the special tokens of the configs beside it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise DataError(f"{path}: tokenizer.json not found: fix the path or re-run llmjax-import")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    return cls(text, _read_special_tokens(os.path.dirname(os.path.abspath(path))), path)

  def __getstate__(self):
    return {"json": self._json, "special": self._special, "path": self._path}

  def __setstate__(self, state):
    self.__init__(state["json"], state["special"], state["path"])

  def __repr__(self) -> str:
    return f"HFTokenizer(path={self._path!r}, vocab_size={self.vocab_size})"

  @property
  def path(self) -> str | None:
    return self._path

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def unk_id(self) -> int:
    return self._ids["unk"]

  @property
  def bos_id(self) -> int:
    return self._ids["bos"]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  @property
  def special_token_ids(self) -> dict[str, int]:
    """The chat tokens of `SPECIAL_TOKENS` present in this vocabulary, by piece."""
    ids = {t: self._tok.token_to_id(t) for t in SPECIAL_TOKENS}
    return {t: i for t, i in ids.items() if i is not None}

  def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
    if add_bos and self.bos_id >= 0:
      ids = [self.bos_id] + ids
    if add_eos and self.eos_id >= 0:
      ids = ids + [self.eos_id]
    return ids

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; bos/eos only when asked (the JSON's post-processor is bypassed)."""
    return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, add_bos, add_eos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [self._wrap(e.ids, add_bos, add_eos) for e in encs]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad/bos/eos decode to nothing, chat tokens to their text."""
    drop = {self.pad_id, self.bos_id, self.eos_id} - {-1}
    return self._tok.decode([int(i) for i in ids if int(i) not in drop],
                            skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def token_id(self, piece: str) -> int:
    """The id of one token (e.g. '<|im_start|>'); ConfigError if the vocabulary lacks it."""
    i = self._tok.token_to_id(piece)
    if i is None:
      raise ConfigError(f"tokenizer {self._path or ''} has no token {piece!r}: use a token "
                        "of this model's vocabulary")
    return i

  def to_json_str(self) -> str:
    return self._json


def load_tokenizer(path: str) -> Tokenizer | HFTokenizer:
  """A SentencePiece `.model` or a Hugging Face `tokenizer.json`, by file extension."""
  path = os.fspath(path)
  if path.endswith(".json"):
    return HFTokenizer.load(path)
  if path.endswith(".model"):
    return Tokenizer.load(path)
  raise DataError(f"{path}: unknown tokenizer format: give a SentencePiece .model file or a "
                  "Hugging Face tokenizer.json")
