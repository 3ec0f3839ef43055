"""SentencePiece tokenizer training, fixed ids, determinism, and the llmjax-tokenizer CLI."""

import json
import pickle
import subprocess
import sys

import pytest

from llmjax.data import synthetic
from llmjax.data import tokenizer as tokenizer_lib
from llmjax.data.tokenizer import Tokenizer, check_fits_model, train_tokenizer
from llmjax.errors import ConfigError, DataError


def test_fixed_ids(builtin_tokenizer):
  tok = builtin_tokenizer
  assert tok.vocab_size == 512
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert tok.special_token_ids == {t: 4 + i for i, t in enumerate(tokenizer_lib.SPECIAL_TOKENS)}
  assert tok.encode("Alice", add_bos=True, add_eos=True)[0::len(tok.encode("Alice")) + 1] == [
      2, 3]


def test_round_trip_on_synthetic_text(builtin_tokenizer):
  tok = builtin_tokenizer
  docs = synthetic.pretraining_documents("eval")
  for doc, ids in zip(docs, tok.encode_batch(docs)):
    assert tok.decode(ids) == doc
    assert tok.unk_id not in ids
  # Byte fallback and no normalization: any text survives, whitespace included.
  odd = "  two  spaces\n\nnewlines\ttab ünïcode 漢字 🙂 "
  assert tok.decode(tok.encode(odd)) == odd
  # Learned pieces compress the corpus well below one token per character.
  assert sum(map(len, tok.encode_batch(docs))) < 0.5 * sum(map(len, docs))


def test_decode_drops_padding_and_control_tokens(builtin_tokenizer):
  tok = builtin_tokenizer
  ids = tok.encode("7 + 5 = 12.", add_bos=True, add_eos=True)
  assert tok.decode(ids + [tok.pad_id] * 3) == "7 + 5 = 12."
  assert tok.decode(ids[1:-1] + [tok.eos_id] + ids[1:-1]) == "7 + 5 = 12.7 + 5 = 12."


def test_special_tokens_are_single_ids(builtin_tokenizer):
  tok = builtin_tokenizer
  for piece in tokenizer_lib.SPECIAL_TOKENS:
    assert tok.encode(piece) == [tok.token_id(piece)]
  ids = tok.encode("<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n")
  assert ids[0] == tok.token_id("<|im_start|>")
  assert tok.token_id("<|im_end|>") in ids
  assert tok.decode(ids) == "<|im_start|>user\nWhat is 7 + 5?<|im_end|>\n"
  with pytest.raises(ConfigError, match="no piece '<nope>'"):
    tok.token_id("<nope>")
  assert tok.token_id("<unk>") == tok.unk_id


def test_training_is_deterministic(tmp_path):
  docs = synthetic.pretraining_documents("train", 500)
  for model_type in ("bpe", "unigram"):
    a = train_tokenizer(docs, str(tmp_path / "a.model"), vocab_size=400, model_type=model_type)
    b = train_tokenizer(iter(docs), str(tmp_path / "b.model"), vocab_size=400,
                        model_type=model_type)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert a.serialized_model_proto() == (tmp_path / "a.model").read_bytes()
    assert b.vocab_size == 400


def test_long_lines_are_kept(tmp_path):
  long_doc = " ".join(["zebra"] * 5000)  # far beyond SentencePiece's sentence limit
  tok = train_tokenizer([long_doc, "a b c"], str(tmp_path / "t.model"), vocab_size=280)
  assert len(tok.encode(" zebra")) == 1


def test_bad_options(tmp_path):
  docs = synthetic.pretraining_documents("train", 100)
  with pytest.raises(ConfigError, match=r"vocab_size=300 is too small.*--vocab_size>=\d+"):
    train_tokenizer(docs, str(tmp_path / "t.model"), vocab_size=300)
  minimum = tokenizer_lib.min_vocab_size(len(set("".join(docs))), byte_fallback=True)
  train_tokenizer(docs, str(tmp_path / "t.model"), vocab_size=minimum)
  with pytest.raises(ConfigError, match="use one of bpe, unigram"):
    train_tokenizer(docs, str(tmp_path / "t.model"), model_type="wordpiece")
  with pytest.raises(ConfigError, match="Vocabulary size too high"):
    train_tokenizer(["tiny corpus"], str(tmp_path / "t.model"), vocab_size=4000)
  with pytest.raises(DataError, match="every input document is empty"):
    train_tokenizer(["", "\n"], str(tmp_path / "t.model"))


def test_load_and_pickle(builtin_tokenizer, tmp_path):
  tok = Tokenizer.load(builtin_tokenizer.path)
  assert tok.serialized_model_proto() == builtin_tokenizer.serialized_model_proto()
  clone = pickle.loads(pickle.dumps(tok))
  assert clone.path == tok.path and clone.vocab_size == 512
  assert clone.encode("Alice lives in Oslo.") == tok.encode("Alice lives in Oslo.")
  with pytest.raises(DataError, match="missing.model: tokenizer model not found"):
    Tokenizer.load(str(tmp_path / "missing.model"))
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"not a model")
  with pytest.raises(DataError, match="junk.model: not a SentencePiece model"):
    Tokenizer.load(str(junk))


def test_check_fits_model(builtin_tokenizer):
  check_fits_model(builtin_tokenizer, 512)
  with pytest.raises(ConfigError, match="has 512 pieces but the model's vocab_size is 256"):
    check_fits_model(builtin_tokenizer, 256)


def _cli(*args, cwd):
  return subprocess.run([sys.executable, "-m", "llmjax.cli.tokenizer", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=60, check=False)


def test_cli_trains_on_jsonl(tmp_path):
  docs = synthetic.pretraining_documents("train", 300)
  (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
  out = tmp_path / "out" / "tok.model"
  result = _cli("--input=*.jsonl", f"--output={out}", "--vocab_size=400", cwd=tmp_path)
  assert result.returncode == 0, result.stderr
  assert "vocab_size: 400" in result.stdout and str(out) in result.stdout
  assert Tokenizer.load(str(out)).vocab_size == 400


def test_cli_bad_line_exits_2(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": 7}\n')
  result = _cli("--input=a.jsonl", "--output=tok.model", cwd=tmp_path)
  assert result.returncode == 2
  assert result.stderr.startswith("error: a.jsonl:2: 'text' is int")
  assert "Traceback" not in result.stderr
  result = _cli("--input=a.jsonl", "--output=tok.model", "--skip_bad_lines",
                "--vocab_size=280", cwd=tmp_path)
  assert "skipped 1 bad lines" in result.stdout
  result = _cli("--output=tok.model", cwd=tmp_path)
  assert result.returncode == 2 and "--input" in result.stderr
