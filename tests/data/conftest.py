"""Shared data fixtures."""

import pytest

from llmjax.data import synthetic
from llmjax.data.tokenizer import Tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def builtin_tokenizer(tmp_path_factory) -> Tokenizer:
  """A 512-piece BPE tokenizer trained on 2000 builtin train documents (about 0.1 s)."""
  path = tmp_path_factory.mktemp("tokenizer") / "builtin.model"
  return train_tokenizer(synthetic.pretraining_documents("train", 2000), str(path),
                         vocab_size=512)
