"""Stage `pretrain`: next-token prediction on raw text, packed."""

from __future__ import annotations

import dataclasses

import gin
import jax

from llmjax import metrics as metrics_lib
from llmjax.data import pipeline
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.stages.context import RunContext, TokenizerConfig
from llmjax.train import loop
from llmjax.train.losses import lm_objective
from llmjax.train.optimizer import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Pretrain:
  name = "pretrain"
  model: ModelConfig
  data: pipeline.DataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  init_from: str | None = None
  lora: LoraConfig | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    train_docs, eval_docs = pipeline.document_sources(self.data)
    tokenizer = ctx.ensure_tokenizer(self.tokenizer, train_docs, self.model)
    pid, nproc = jax.process_index(), jax.process_count()
    train_ds = pipeline.train_dataset(self.data, tokenizer, train_docs, pid, nproc)
    eval_data = pipeline.eval_batches(self.data, tokenizer, eval_docs, pid, nproc)
    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, {"unigram_loss": metrics_lib.unigram_loss(eval_data)}, kind="baseline")
      return loop.train(stage=self.name, policy=policy,
                        loss_fn=lm_objective(self.train.loss_chunk_size),
                        train_data=train_ds, eval_data=eval_data, train_cfg=self.train,
                        opt_cfg=self.optimizer, writer=writer,
                        meta={"tokenizer": ctx.tokenizer_file(), **start_meta},
                        **ctx.loop_kwargs())
    finally:
      writer.close()


@gin.configurable("pretrain")
def pretrain_stage(model: ModelConfig = gin.REQUIRED,
                   data: pipeline.DataConfig = gin.REQUIRED,
                   train: loop.TrainConfig = gin.REQUIRED,
                   optimizer: OptimizerConfig = OptimizerConfig(),
                   tokenizer: TokenizerConfig = TokenizerConfig(),
                   init_from: str | None = None,
                   lora: LoraConfig | None = None) -> Pretrain:
  """The pretraining stage as configured in gin (`pretrain.model = @model_config()`, ...).

  `init_from`: where to start (default: the previous stage of this run, or a random init
  when pretraining comes first): an earlier stage's name, or a workdir (a run, or an
  `llmjax-import` of an HF model; `'dir:stage'` picks one of its stages), e.g. to continue
  pretraining. `lora`: continue pretraining with LoRA adapters on that start.
  """
  return Pretrain(model, data, train, optimizer, tokenizer, init_from, lora)
