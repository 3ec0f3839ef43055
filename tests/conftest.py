"""Fixtures shared by the whole suite: one tokenizer and one tiny model config, built once."""

import dataclasses

import pytest

from llmjax.data import synthetic
from llmjax.data.tokenizer import train_tokenizer
from llmjax.model.config import PRESETS

# The smallest model the tests train: 2 layers, d_model 64, vocab 512.
TEST_MODEL = dataclasses.replace(PRESETS["tiny"], d_model=64, d_ff=128, n_heads=4, n_kv_heads=2)


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory):
  """A 512-piece BPE tokenizer trained on 2000 built-in documents (path to the .model)."""
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
  train_tokenizer(synthetic.pretraining_documents("train", 2000), path, vocab_size=512)
  return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
  from llmjax.data.tokenizer import Tokenizer
  return Tokenizer.load(tokenizer_path)
