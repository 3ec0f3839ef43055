"""SentencePiece tokenizers with fixed special ids and reserved chat-role tokens.

Ids 0-3 are always pad, unk, bos, eos; the chat tokens in `SPECIAL_TOKENS` follow (as
user-defined symbols, so they encode to one id wherever they appear in text). Text is not
normalized and no dummy prefix is added, so with byte fallback `decode(encode(x)) == x`
for every string, and encoding a concatenation equals concatenating encodings at most
boundaries, which the chat templates rely on.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any, Iterable, Iterator, Sequence

import sentencepiece as spm

from llmjax.errors import ConfigError, DataError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>")
MODEL_TYPES = ("bpe", "unigram")
# SentencePiece drops training sentences longer than max_sentence_length bytes; we cut
# long lines well below it instead of losing them.
_MAX_SENTENCE_BYTES = 4096
_CHUNK_CHARS = 1000


class Tokenizer:
  """A loaded SentencePiece model. Picklable: it pickles as its serialized proto."""

  def __init__(self, model_proto: bytes, path: str | None = None):
    self._proto = bytes(model_proto)
    self._path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
      raise DataError(f"{path or 'tokenizer'}: not a SentencePiece model ({e}): pass the "
                      ".model file written by llmjax-tokenizer") from None

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    """Loads a `.model` file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise DataError(f"{path}: tokenizer model not found: train one with llmjax-tokenizer "
                      "--output=PATH or fix the path")
    with open(path, "rb") as f:
      return cls(f.read(), path)

  def __getstate__(self):
    return {"proto": self._proto, "path": self._path}

  def __setstate__(self, state):
    self.__init__(state["proto"], state["path"])

  def __repr__(self) -> str:
    return f"Tokenizer(path={self._path!r}, vocab_size={self.vocab_size})"

  @property
  def path(self) -> str | None:
    return self._path

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def special_token_ids(self) -> dict[str, int]:
    """The chat tokens of `SPECIAL_TOKENS` present in this model, by piece."""
    return {t: self._sp.PieceToId(t) for t in SPECIAL_TOKENS if self._has_piece(t)}

  def _has_piece(self, piece: str) -> bool:
    i = self._sp.PieceToId(piece)
    return i != self.unk_id or piece == self._sp.IdToPiece(self.unk_id)

  def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with bos/eos."""
    return self._sp.EncodeAsIds(text, add_bos=add_bos, add_eos=add_eos)

  def encode_batch(self, texts: Sequence[str], add_bos: bool = False,
                   add_eos: bool = False) -> list[list[int]]:
    return self._sp.EncodeAsIds(list(texts), add_bos=add_bos, add_eos=add_eos)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; padding is dropped, bos/eos decode to nothing, decoding never stops."""
    return self._sp.DecodeIds([int(i) for i in ids if int(i) != self.pad_id])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def token_id(self, piece: str) -> int:
    """The id of one piece (e.g. '<|im_start|>'); ConfigError if the model lacks it."""
    if not self._has_piece(piece):
      raise ConfigError(f"tokenizer {self._path or ''} has no piece {piece!r}: retrain it "
                        "with llmjax-tokenizer (which reserves the chat tokens) or use "
                        "another piece")
    return self._sp.PieceToId(piece)

  def serialized_model_proto(self) -> bytes:
    return self._proto


def same_vocabulary(a: Any, b: Any) -> bool:
  """Whether two tokenizers (sentencepiece or HF) map every id to the same piece."""
  if a is b:
    return True
  return a.vocab_size == b.vocab_size and all(
      a.id_to_piece(i) == b.id_to_piece(i) for i in range(a.vocab_size))


def check_fits_model(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """ConfigError unless every token id fits the model's embedding table."""
  if tokenizer.vocab_size > model_vocab_size:
    raise ConfigError(
        f"tokenizer {tokenizer.path or ''} has {tokenizer.vocab_size} pieces but the model's "
        f"vocab_size is {model_vocab_size}: train a tokenizer with "
        f"--vocab_size<={model_vocab_size} or raise model vocab_size")


def _sentences(texts: Iterable[str], max_sentences: int, chars: set[str]) -> Iterator[str]:
  """Non-empty lines of `texts`, long ones cut at spaces, at most `max_sentences`."""
  n = 0
  for text in texts:
    for line in text.splitlines():
      while line.strip():
        # Cut near _CHUNK_CHARS at a space so pieces never span the cut mid-word.
        cut = len(line) if len(line) <= _CHUNK_CHARS else (
            line.rfind(" ", _CHUNK_CHARS // 2, _CHUNK_CHARS) + 1 or _CHUNK_CHARS)
        piece, line = line[:cut], line[cut:]
        if piece.strip():
          chars.update(piece)
          yield piece
          n += 1
          if n >= max_sentences:
            return


def min_vocab_size(num_chars: int, byte_fallback: bool) -> int:
  """Smallest vocab SentencePiece accepts: ids 0-3, chat tokens, bytes and every character."""
  return 4 + len(SPECIAL_TOKENS) + (256 if byte_fallback else 0) + num_chars


def train_tokenizer(texts: Iterable[str], output_path: str, vocab_size: int = 512,
                    model_type: str = "bpe", byte_fallback: bool = True,
                    character_coverage: float = 1.0, max_sentences: int = 200_000,
                    seed: int = 0) -> Tokenizer:
  """Trains a tokenizer on `texts` (one document each) and writes it to `output_path`.

  Deterministic: the same texts and options give byte-identical model files (training is
  single-threaded on the first `max_sentences` lines, unshuffled). `seed` is accepted for
  API symmetry; with no sampling there is nothing random left to seed.
  """
  del seed
  if model_type not in MODEL_TYPES:
    raise ConfigError(f"unknown tokenizer model_type {model_type!r}: use one of "
                      f"{', '.join(MODEL_TYPES)}")
  if max_sentences < 1:
    raise ConfigError(f"max_sentences must be positive, got {max_sentences}")
  chars: set[str] = set()
  # Materialized so the character count is known before SentencePiece sees the data.
  sentences = list(_sentences(texts, max_sentences, chars))
  if not sentences:
    raise DataError("no text to train the tokenizer on: every input document is empty")
  # SentencePiece requires more than its fixed pieces plus one per character it must keep.
  required = len(chars) if character_coverage >= 1.0 else 0
  minimum = min_vocab_size(required, byte_fallback)
  if vocab_size < minimum:
    fallback = " (256 of them byte-fallback pieces)" if byte_fallback else ""
    raise ConfigError(
        f"vocab_size={vocab_size} is too small: this corpus needs at least {minimum} pieces"
        f"{fallback} for the special tokens and its {len(chars)} distinct characters; "
        f"set --vocab_size>={minimum}")
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type=model_type, byte_fallback=byte_fallback,
        character_coverage=character_coverage, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        eos_id=EOS_ID, pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>",
        eos_piece="</s>", user_defined_symbols=list(SPECIAL_TOKENS),
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        max_sentence_length=_MAX_SENTENCE_BYTES, input_sentence_size=0,
        shuffle_input_sentence=False, num_threads=1, minloglevel=2)
  except RuntimeError as e:
    reason = str(e).rsplit("] ", 1)[-1]  # drop SentencePiece's source location
    raise ConfigError(f"SentencePiece could not train a {model_type} tokenizer with "
                      f"vocab_size={vocab_size}: {reason} Adjust --vocab_size or give more "
                      "text.") from None
  _write_atomic(output_path, model.getvalue())
  return Tokenizer(model.getvalue(), os.fspath(output_path))


def _write_atomic(path: str, data: bytes) -> None:
  """Writes via a temporary file in the same directory, so readers never see half a file."""
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".model")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; a model file is meant to be shared
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
