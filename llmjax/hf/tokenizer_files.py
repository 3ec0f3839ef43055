"""Tokenizer files of an HF export: `tokenizer.model`, `tokenizer.json` and their configs.

`tokenizer.json` is built from the SentencePiece proto with the `tokenizers` package (never
transformers, which is not an llmjax dependency), so `AutoTokenizer.from_pretrained` loads the
exact tokenizer without a slow->fast conversion that could guess normalization differently.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging

from llmjax.data.tokenizer import SPECIAL_TOKENS
from llmjax.hf.export import write_json

_SP_NORMAL, _SP_UNKNOWN, _SP_CONTROL, _SP_USER_DEFINED, _SP_UNUSED, _SP_BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_to_tokenizer_json(proto: bytes) -> str | None:
  """The `tokenizers` JSON equivalent of a SentencePiece model, or None (with a warning) when
  `tokenizers` or protobuf is not installed or the model type has no equivalent."""
  try:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
  except ImportError as e:
    logging.warning("Not writing tokenizer.json (%s): pip install tokenizers protobuf to get "
                    "one; transformers will convert tokenizer.model itself", e)
    return None
  m = sp_pb2.ModelProto()
  m.ParseFromString(proto)
  pieces = list(m.pieces)
  unk_id = next((i for i, p in enumerate(pieces) if p.type == _SP_UNKNOWN), None)
  byte_fallback = m.trainer_spec.byte_fallback
  if m.trainer_spec.model_type == 2:  # BPE
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    normal = {p.piece for p in pieces if p.type == _SP_NORMAL}
    # SentencePiece BPE applies the merge giving the highest-scoring (lowest-id) piece first;
    # HF BPE applies merges in list order, so order merges by the id of the merged piece.
    merges = []
    for piece in normal:
      for cut in range(1, len(piece)):
        left, right = piece[:cut], piece[cut:]
        if left in normal and right in normal:
          merges.append((vocab[piece], vocab[left], vocab[right], left, right))
    merges.sort()
    model = models.BPE(vocab=vocab, merges=[(l, r) for *_, l, r in merges],
                       unk_token=pieces[unk_id].piece if unk_id is not None else None,
                       fuse_unk=True, byte_fallback=byte_fallback)
  elif m.trainer_spec.model_type == 1:  # unigram
    model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=unk_id,
                           byte_fallback=byte_fallback)
  else:
    logging.warning("Not writing tokenizer.json: SentencePiece model type %d has no "
                    "tokenizers equivalent", m.trainer_spec.model_type)
    return None
  tok = Tokenizer(model)
  spec = m.normalizer_spec
  norms = []
  if spec.precompiled_charsmap:
    norms.append(normalizers.Precompiled(spec.precompiled_charsmap))
  if spec.remove_extra_whitespaces:
    norms += [normalizers.Strip(left=True, right=True),
              normalizers.Replace(Regex(" {2,}"), " ")]
  if spec.add_dummy_prefix:
    norms.append(normalizers.Prepend("▁"))
  if spec.escape_whitespaces:
    norms.append(normalizers.Replace(" ", "▁"))
  tok.normalizer = normalizers.Sequence(norms)
  decs = [decoders.Replace("▁", " ")]
  if byte_fallback:
    decs.append(decoders.ByteFallback())
  decs.append(decoders.Fuse())
  if spec.add_dummy_prefix:
    decs.append(decoders.Strip(content=" ", left=1, right=0))
  tok.decoder = decoders.Sequence(decs)
  # Control pieces (<s>, </s>, <pad>), <unk> and the chat tokens match as whole tokens, as
  # SentencePiece's user-defined symbols do.
  specials = [AddedToken(p.piece, special=True, normalized=False)
              for p in pieces if p.type in (_SP_CONTROL, _SP_UNKNOWN, _SP_USER_DEFINED)]
  tok.add_special_tokens(specials)
  return tok.to_str()


def _bos_post_processor(tok_json: str, bos: str, bos_id: int) -> str:
  """Adds bos to every encoding, like Llama tokenizers (and llmjax prompts) do."""
  from tokenizers import Tokenizer, processors
  tok = Tokenizer.from_str(tok_json)
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
  return tok.to_str()


def write_tokenizer_files(tokenizer: Any, directory: str, chat_template: str | None = None,
                          model_max_length: int | None = None) -> list[str]:
  """Writes the files `AutoTokenizer.from_pretrained(directory)` needs; returns their names.

  `tokenizer`: an llmjax `Tokenizer` (SentencePiece) or `HFTokenizer` (tokenizer.json).
  """
  def piece(i: int) -> str | None:
    return tokenizer.id_to_piece(i) if 0 <= i < tokenizer.vocab_size else None

  bos, eos, pad, unk = (piece(tokenizer.bos_id), piece(tokenizer.eos_id),
                        piece(tokenizer.pad_id), piece(tokenizer.unk_id))
  written = []
  tok_json = None
  if hasattr(tokenizer, "serialized_model_proto"):
    proto = tokenizer.serialized_model_proto()
    with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
      f.write(proto)
    written.append("tokenizer.model")
    tok_json = sentencepiece_to_tokenizer_json(proto)
    if tok_json is not None and bos is not None:
      tok_json = _bos_post_processor(tok_json, bos, tokenizer.bos_id)
  elif hasattr(tokenizer, "to_json_str"):
    tok_json = tokenizer.to_json_str()
  if tok_json is not None:
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as f:
      f.write(tok_json)
    written.append("tokenizer.json")
  special_map = {k: v for k, v in (("bos_token", bos), ("eos_token", eos),
                                   ("pad_token", pad), ("unk_token", unk)) if v is not None}
  chat = [t for t in SPECIAL_TOKENS if t in tokenizer.special_token_ids]
  if chat:
    special_map["additional_special_tokens"] = chat
  config = {
      # With tokenizer.json present the generic fast class loads it verbatim; LlamaTokenizer
      # would rebuild the pre-tokenizer and add a dummy prefix space our models never saw.
      "tokenizer_class": "PreTrainedTokenizerFast" if tok_json else "LlamaTokenizer",
      "add_bos_token": bos is not None, "add_eos_token": False,
      "clean_up_tokenization_spaces": False, "legacy": False,
      **special_map,
  }
  if tok_json is None:
    config["add_prefix_space"] = False
  original = (os.path.join(os.path.dirname(os.path.abspath(tokenizer.path)),
                           "tokenizer_config.json") if tokenizer.path else "")
  if tok_json and not hasattr(tokenizer, "serialized_model_proto") and os.path.isfile(original):
    # An imported HF tokenizer: keep its own config (class, added tokens, flags).
    with open(original, encoding="utf-8") as f:
      config = json.load(f)
  if model_max_length:
    config["model_max_length"] = model_max_length
  if chat_template:
    config["chat_template"] = chat_template
  write_json(os.path.join(directory, "tokenizer_config.json"), config)
  write_json(os.path.join(directory, "special_tokens_map.json"), special_map)
  return written + ["tokenizer_config.json", "special_tokens_map.json"]
