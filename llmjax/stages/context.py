"""What one stage hands the next: the run's workdir, its tokenizer, the latest parameters."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import gin
import jax
from absl import logging

from llmjax.data.hf_tokenizer import load_tokenizer
from llmjax.data.tokenizer import Tokenizer, check_fits_model, train_tokenizer
from llmjax.model.config import ModelConfig

TOKENIZER_FILE = "tokenizer.model"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Which tokenizer a run uses.

  With `path` unset, the run trains a SentencePiece model on (up to `train_documents` of) its
  own training documents and keeps it as `<workdir>/tokenizer.model`; a resumed run reuses it.
  """
  path: str | None = None
  vocab_size: int | None = None  # None: the model's vocab_size
  model_type: str = "bpe"
  byte_fallback: bool = True
  train_documents: int = 20_000


@dataclasses.dataclass
class RunContext:
  """Shared by the stages of one `llmjax-train` run."""
  workdir: str
  stop_after: int | None = None  # stop every stage at this step (tests, preemption drills)
  params: Any = None  # the previous stage's final parameters
  model_cfg: ModelConfig | None = None  # ... and the config they belong to
  tokenizer: Tokenizer | None = None
  mesh: Any = None  # jax.sharding.Mesh over all devices; None: data parallel over all
  rules: str | None = None  # name of the logical-axis rule set (llmjax.parallel.mesh)

  def loop_kwargs(self) -> dict[str, Any]:
    """What every stage passes to `llmjax.train.loop.train` from the run itself."""
    return {"workdir": self.workdir, "initial_params": self.params,
            "stop_after": self.stop_after, "mesh": self.mesh, "rules": self.rules}

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0

  def start_from(self, init_from: str | None, model_cfg: ModelConfig) -> None:
    """Takes initial parameters (and tokenizer) from another run or an HF import.

    Applies only when no earlier stage of this run produced parameters; a stage that has its
    own checkpoint resumes from that instead.
    """
    if self.params is not None or not init_from:
      return
    from llmjax.checkpoint import check_same_model, load_run
    loaded = load_run(init_from)
    check_same_model(dataclasses.asdict(loaded.model_cfg), model_cfg, init_from)
    self.params, self.model_cfg = loaded.params, loaded.model_cfg
    if self.tokenizer is None:
      self.tokenizer = loaded.tokenizer
    logging.info("Starting from %s (stage %s, step %d)", init_from, loaded.stage, loaded.step)

  def ensure_tokenizer(self, cfg: TokenizerConfig, documents: Any,
                       model_cfg: ModelConfig) -> Tokenizer:
    """Loads or trains the run's tokenizer and checks that the model can embed it."""
    if self.tokenizer is None:
      local = os.path.join(self.workdir, TOKENIZER_FILE)
      if cfg.path:
        self.tokenizer = load_tokenizer(cfg.path)
      elif os.path.exists(local):
        self.tokenizer = Tokenizer.load(local)
      else:
        self.tokenizer = self._train(cfg, documents, model_cfg, local)
    check_fits_model(self.tokenizer, model_cfg.vocab_size)
    self._keep_copy()
    return self.tokenizer

  def tokenizer_file(self) -> str:
    """The tokenizer's file name inside the workdir (recorded in checkpoint metadata)."""
    return os.path.basename(self.tokenizer.path)

  def _keep_copy(self) -> None:
    # A workdir is self-contained: generation and export find the tokenizer beside the
    # checkpoints even when it came from elsewhere (TokenizerConfig.path, init_from).
    target = os.path.join(self.workdir, self.tokenizer_file())
    if self.is_chief and not os.path.exists(target):
      os.makedirs(self.workdir, exist_ok=True)
      shutil.copyfile(self.tokenizer.path, target + ".tmp")
      os.replace(target + ".tmp", target)

  def _train(self, cfg: TokenizerConfig, documents: Any, model_cfg: ModelConfig,
             path: str) -> Tokenizer:
    vocab = cfg.vocab_size or model_cfg.vocab_size
    n = min(len(documents), cfg.train_documents)
    logging.info("Training a %d-piece %s tokenizer on %d documents -> %s", vocab,
                 cfg.model_type, n, path)
    texts = (documents[i] for i in range(n))
    # Every process trains the same deterministic model from the same documents, so no
    # process waits on a shared filesystem; only the chief's copy is kept.
    out = path if self.is_chief else path + f".process{jax.process_index()}"
    os.makedirs(self.workdir, exist_ok=True)
    return train_tokenizer(texts, out, vocab_size=vocab, model_type=cfg.model_type,
                           byte_fallback=cfg.byte_fallback)
