"""Fixtures shared by the whole suite: one tokenizer and one tiny model config, built once."""

import dataclasses
import os
import tempfile

# The suite compiles hundreds of small programs and runs each only a few steps: LLVM at -O0
# cuts a cold suite's CPU time by a fifth to a third (measured per file), and float32
# results are what the tests compare, each against a program built the same way. Set before
# jax starts; the worker subprocesses inherit it and add their device counts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_backend_optimization_level=0")

import gin
import jax
import pytest

# Many tests compile the same programs (a train step per run, resumed runs, the worker
# subprocesses, which inherit the environment): XLA's persistent cache compiles each once. It
# is kept across sessions (a developer's second run is warm); a fresh machine, or
# JAX_COMPILATION_CACHE_DIR pointed at an empty directory, measures the cold suite.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"llmjax-test-xla-cache-{os.getuid()}"))
# The subprocesses read this from the environment (their default, 1 s, skips most programs).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))

from llmjax.data import synthetic
from llmjax.data.tokenizer import train_tokenizer
from llmjax.model.config import PRESETS

# The smallest model the tests train: 2 layers, d_model 64, vocab 512.
TEST_MODEL = dataclasses.replace(PRESETS["tiny"], d_model=64, d_ff=128, n_heads=4, n_kv_heads=2)


@pytest.fixture(autouse=True)
def fresh_gin_bindings():
  """No test sees another's gin bindings (a failed `configure` leaves its bindings behind,
  and configurables such as MeshConfig read them wherever they are built)."""
  yield
  gin.clear_config()


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
