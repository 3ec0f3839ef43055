"""What the stages of one run share: the workdir, the tokenizer, and each finished stage's model."""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Any

import gin
import jax
from absl import logging

from llmjax.data.hf_tokenizer import load_tokenizer
from llmjax.data.tokenizer import Tokenizer, check_fits_model, same_vocabulary, train_tokenizer
from llmjax.errors import CheckpointError, ConfigError
from llmjax.model.config import ModelConfig

TOKENIZER_FILE = "tokenizer.model"
# `init_from` value for a fresh random init, also after earlier stages (a second student of
# another shape, a teacher trained beside its student).
RANDOM_INIT = "random"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """Which tokenizer a run uses.

  With `path` unset, a resumed run uses the tokenizer its checkpoints record (the copy of the
  `path` it was started with, or the one it trained); a new run trains a SentencePiece model
  on (up to `train_documents` of) its own training documents and keeps it as
  `<workdir>/tokenizer.model`.
  """
  path: str | None = None
  vocab_size: int | None = None  # None: the model's vocab_size
  model_type: str = "bpe"
  byte_fallback: bool = True
  train_documents: int = 20_000


@dataclasses.dataclass
class StageOutput:
  """A finished stage's model, kept by the pipeline under the stage's name.

  `params` is the whole state (a LoRA stage's base and adapters); `source` says where its
  checkpoint lives, and is what a stage trained on it records as its base. `tokenizer` is
  the one it was trained with (None: unknown, e.g. an import saved without one).
  """
  graphdef: Any
  params: Any
  model_cfg: ModelConfig
  source: dict[str, Any]
  tokenizer: Any = None  # what it was trained with (None: an import saved without one)

  def float_params(self) -> Any:
    """The parameters of a plain float model (LoRA adapters merged, quantized weights
    dequantized)."""
    from llmjax.runs.load import merged_params
    return merged_params(self.graphdef, self.params)

  def float_model(self) -> tuple[Any, Any]:
    """(graphdef, params) of the plain float model (see `float_params`)."""
    from llmjax.runs.load import float_model
    return float_model(self.graphdef, self.params, self.model_cfg)

  def frozen_role(self) -> Any:
    """This model as a frozen role of another stage (reference, reward, teacher), in its
    plain float form: merged once, rather than recomputing adapters every step."""
    from llmjax.train.roles import Role
    return Role.frozen(*self.float_model(), self.model_cfg)


@dataclasses.dataclass
class RunContext:
  """Shared by the stages of one `llmjax-train` run."""
  workdir: str
  stop_after: int | None = None  # stop every stage at this step (tests, preemption drills)
  outputs: dict[str, StageOutput] = dataclasses.field(default_factory=dict)
  last_stage: str | None = None  # the most recently finished stage
  stopped: tuple[str, int] | None = None  # (stage, step) where a stop request ended the run
  tokenizer: Tokenizer | None = None
  mesh: Any = None  # jax.sharding.Mesh over all devices; None: data parallel over all
  rules: str | None = None  # name of the logical-axis rule set (llmjax.parallel.mesh)
  pipeline: Any = None  # llmjax.parallel.pipeline.PipelineConfig when MeshConfig.stage > 1
  # Other runs' models read by this run (`resolve`), loaded once however many stages use them.
  _loaded: dict[str, StageOutput] = dataclasses.field(default_factory=dict, repr=False)

  def loop_kwargs(self) -> dict[str, Any]:
    """What every stage passes to `llmjax.train.loop.train` from the run itself."""
    return {"workdir": self.workdir, "stop_after": self.stop_after, "mesh": self.mesh,
            "rules": self.rules, "pipeline": self.pipeline}

  @property
  def is_chief(self) -> bool:
    return jax.process_index() == 0

  def resolve(self, source: str, what: str) -> StageOutput:
    """The model `source` names: a finished stage of this run by name (`'sft'`), or another
    workdir or `llmjax-import` (`'runs/big'`, or `'runs/big:sft'` for one of its stages).

    `what` (e.g. "sft.init_from") names the setting in errors.
    """
    if source in self.outputs:
      return self.outputs[source]
    if source in self._loaded:
      return self._loaded[source]
    from llmjax.runs.load import load_run
    path, _, stage = source.partition(":") if not os.path.isdir(source) else (source, "", "")
    if not os.path.isdir(path):
      raise ConfigError(f"{what} = {source!r} is neither a finished stage of this run "
                        f"({sorted(self.outputs) or 'none yet'}) nor a workdir")
    loaded = load_run(path, stage or None)
    if self.tokenizer is None:
      self.tokenizer = loaded.tokenizer
    logging.info("%s: %s (stage %s, step %d)", what, source, loaded.stage, loaded.step)
    self._loaded[source] = StageOutput(loaded.graphdef, loaded.params, loaded.model_cfg,
                                       loaded.source, loaded.tokenizer)
    return self._loaded[source]

  def check_same_vocabulary(self, other: StageOutput, model_cfg: ModelConfig,
                            what: str) -> None:
    """Refuses a model (a reward model, a teacher) whose vocabulary or tokenizer is not this
    run's (`model_cfg` is the policy's): it would judge other tokens than the policy's."""
    name = f"{other.source.get('workdir')} (stage {other.source.get('stage')})"
    if other.model_cfg.vocab_size != model_cfg.vocab_size:
      raise ConfigError(f"{what}: {name} has a vocabulary of {other.model_cfg.vocab_size} "
                        f"tokens, this run's model {model_cfg.vocab_size}: use a model trained "
                        "with this run's tokenizer")
    ours, theirs = self.tokenizer, other.tokenizer
    if ours is not None and theirs is not None and not same_vocabulary(ours, theirs):
      raise ConfigError(f"{what}: {name} was trained with tokenizer {theirs!r}, this run uses "
                        f"{ours!r}, and their vocabularies differ: use a model trained with "
                        "this run's tokenizer")

  def start(self, init_from: str | None, model_cfg: ModelConfig,
            what: str) -> StageOutput | None:
    """Where a stage starts: `init_from` when set, else the stage before it in this run
    (None for the first stage, or `init_from = 'random'`: a random init); a language-model
    stage passes over reward models (PPO after `rm` starts from the policy before it). The
    model shapes must match."""
    if init_from == RANDOM_INIT:
      return None
    if init_from:
      start = self.resolve(init_from, what)
    elif self.last_stage is not None:
      start = self.outputs[self.last_stage]
      if model_cfg.head == "lm" and start.model_cfg.head != "lm":
        language_models = [o for o in self.outputs.values() if o.model_cfg.head == "lm"]
        if not language_models:
          raise ConfigError(f"{what}: every stage before it trained a reward model; set "
                            f"{what} to a language model (a stage, a run or an import)")
        start = language_models[-1]
    else:
      return None
    from llmjax.checkpoint import check_same_model
    if model_cfg.head == "score":  # a reward model starts from a language model's body
      model_cfg = dataclasses.replace(model_cfg, head=start.model_cfg.head,
                                      tie_embeddings=start.model_cfg.tie_embeddings)
    check_same_model(dataclasses.asdict(start.model_cfg), model_cfg,
                     f"{what} ({start.source['workdir']}, stage {start.source['stage']})")
    return start

  def policy(self, what: str, model_cfg: ModelConfig, init_from: str | None,
             lora_cfg: Any = None, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """(the stage's policy `Role`, what its checkpoint meta records about its start).

    `what` is the stage's name. With `lora_cfg` the start is the frozen base and the
    checkpoints hold the adapters alone; their meta names the base, so loading, resuming
    and export find it.
    """
    from llmjax.train.roles import policy_role
    start = self.start(init_from, model_cfg, f"{what}.init_from")
    if lora_cfg is not None and start is None:
      raise ConfigError(f"{what}.lora is set but {what} has no base model to adapt: run it "
                        f"after a stage that trains one, or set {what}.init_from to a run or "
                        "an llmjax-import")
    init = start.float_params() if start else None
    if init is not None and model_cfg.head == "score" and start.model_cfg.head == "lm":
      from llmjax.model.reward import init_reward_model
      init = init_reward_model(init, model_cfg, seed)  # the body copied, a fresh score head
    role = policy_role(model_cfg, init, lora_cfg, seed)
    meta = {"lora": lora_cfg.to_dict(), "base": start.source} if lora_cfg is not None else {}
    return role, meta

  def finish(self, name: str, graphdef: Any, params: Any, model_cfg: ModelConfig,
             step: int) -> None:
    """Keeps a finished stage's model under its name for the stages after it."""
    self.outputs[name] = StageOutput(graphdef, params, model_cfg,
                                     {"workdir": os.path.abspath(self.workdir), "stage": name,
                                      "step": step}, self.tokenizer)
    self.last_stage = name

  def ensure_tokenizer(self, cfg: TokenizerConfig, documents: Any, model_cfg: ModelConfig,
                       stage: str = "", has_start: bool = False) -> Tokenizer:
    """Loads or trains the run's tokenizer and checks that the model can embed it.

    `has_start`: `stage` starts from trained parameters, whose tokenizer it must use (never
    one trained afresh here).
    """
    if self.tokenizer is None:
      # Resumed without TokenizerConfig.path: the tokenizer the checkpoints were trained
      # with, not a new one (a path that is not that one is refused by
      # llmjax.cli.train.check_resumable).
      path = cfg.path or self._recorded_tokenizer(stage)
      if has_start and not path:
        raise ConfigError(f"{stage} starts from parameters without a tokenizer: set "
                          "TokenizerConfig.path to the tokenizer the model was trained with")
      local = os.path.join(self.workdir, TOKENIZER_FILE)
      if path:
        self.tokenizer = load_tokenizer(path)
      elif os.path.exists(local):
        self.tokenizer = Tokenizer.load(local)
      else:
        self.tokenizer = self._train(cfg, documents, model_cfg, local)
    check_fits_model(self.tokenizer, model_cfg.vocab_size)
    self._keep_copy()
    return self.tokenizer

  def _recorded_tokenizer(self, stage: str) -> str | None:
    """The path of the tokenizer the workdir's checkpoints record (None: none do)."""
    from llmjax.runs.load import recorded_tokenizer
    name = recorded_tokenizer(self.workdir, stage or None)
    if name is None:
      return None
    path = os.path.join(self.workdir, name)
    if not os.path.isfile(path):
      raise CheckpointError(f"{path} is missing: the checkpoints in {self.workdir} were "
                            "trained with it; copy it back into the workdir, or set "
                            "TokenizerConfig.path to a copy of it")
    return path

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
