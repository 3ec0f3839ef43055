"""Stage `sft`: supervised fine-tuning on instructions, loss on assistant tokens only.

Starts from the previous stage's parameters (`pipeline.stages = ['pretrain', 'sft']`) or from
`init_from` (a run or an `llmjax-import` of an HF model). Conversations are rendered with a
chat template (`sft.chat_template`), packed whole, and trained with the ordinary next-token
loss, which `loss_mask` restricts to the replies. Every evaluation also generates greedy
answers to held-out questions and logs their exact-match accuracy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin
import jax
from absl import logging
from flax import nnx

from llmjax import metrics as metrics_lib
from llmjax.data import chat, instructions
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.sample.sampler import Sampler
from llmjax.stages.context import RANDOM_INIT, RunContext, TokenizerConfig
from llmjax.train import loop
from llmjax.train.losses import lm_objective
from llmjax.train.optimizer import OptimizerConfig


def exact_match(graphdef: nnx.GraphDef, params: Any, tokenizer: Any, template: str,
                items: Sequence[dict[str, Any]], max_new_tokens: int = 16,
                max_batch: int = 256) -> dict[str, float]:
  """Greedy-answers each `{messages, answer}` item; the fraction answered exactly.

  Answers compare after `instructions.normalize_answer` (case, spaces, a final period).
  Items with a `rejected` answer (preference pairs) also count how often the greedy answer
  is that one (`rejected_match`): what preference training should move away from.
  """
  if not items:
    return {}
  sampler = Sampler(graphdef, params, tokenizer, eos_ids=chat.stop_token_ids(tokenizer, template),
                    max_batch=max_batch)
  prompts = [chat.prompt_ids(it["messages"], template, tokenizer) for it in items]
  out = sampler.sample(prompts, max_new_tokens=max_new_tokens)
  norm = instructions.normalize_answer
  answers = [norm(out.texts[i][0]) for i in range(len(items))]
  hits = [a == norm(it["answer"]) for a, it in zip(answers, items)]
  result = {"exact_match": sum(hits) / len(hits), "exact_match_n": len(hits)}
  if all("rejected" in it for it in items):
    result["rejected_match"] = sum(a == norm(it["rejected"]) for a, it in
                                   zip(answers, items)) / len(items)
  return result


@dataclasses.dataclass(frozen=True)
class SFT:
  name = "sft"
  model: ModelConfig
  data: instructions.SFTDataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  chat_template: str = "chatml"
  init_from: str | None = None
  eval_questions: int = 200  # held-out questions answered per evaluation (0: none)
  eval_max_new_tokens: int = 16
  lora: LoraConfig | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    chat.get_template(self.chat_template)  # a bad name fails before any data is read
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    train_convs, eval_convs, skipped = instructions.conversations(self.data)
    tokenizer = self._tokenizer(ctx, train_convs)
    train_ex, eval_ex, counts = instructions.tokenize_splits(
        train_convs, eval_convs, skipped, tokenizer, self.chat_template, self.data)
    logging.info("sft data (%s, overlong=%s): %s", self.chat_template, self.data.overlong,
                 counts)
    pid, nproc = jax.process_index(), jax.process_count()
    train_ds = instructions.train_batches(train_ex, self.data, pid, nproc)
    eval_data = instructions.eval_batches(eval_ex, self.data, pid, nproc)
    items = instructions.reference_items(eval_convs)[:self.eval_questions]

    def extra_eval(graphdef, params, step):
      del step
      return exact_match(graphdef, params, tokenizer, self.chat_template, items,
                         self.eval_max_new_tokens)

    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, counts, kind="data")
      meta = {"tokenizer": ctx.tokenizer_file(), "chat_template_name": self.chat_template,
              "chat_template": chat.chat_template_jinja(self.chat_template), **start_meta}
      # The loss mask is the assistant-token mask, so the pretraining loss is the SFT loss.
      return loop.train(stage=self.name, policy=policy,
                        loss_fn=lm_objective(self.train.loss_chunk_size),
                        train_data=train_ds, eval_data=eval_data, train_cfg=self.train,
                        opt_cfg=self.optimizer, writer=writer, meta=meta,
                        extra_eval=extra_eval if items else None, **ctx.loop_kwargs())
    finally:
      writer.close()

  def _tokenizer(self, ctx: RunContext, convs: list) -> Any:
    texts = [chat.render_text(c, self.chat_template) for c in convs]
    tokenizer = ctx.ensure_tokenizer(self.tokenizer, texts, self.model, self.name,
                                     has_start=self.init_from != RANDOM_INIT
                                     and bool(ctx.last_stage or self.init_from))
    chat.stop_token_ids(tokenizer, self.chat_template)  # ConfigError if it lacks the tokens
    return tokenizer


@gin.configurable("sft")
def sft_stage(model: ModelConfig = gin.REQUIRED,
              data: instructions.SFTDataConfig = gin.REQUIRED,
              train: loop.TrainConfig = gin.REQUIRED,
              optimizer: OptimizerConfig = OptimizerConfig(),
              tokenizer: TokenizerConfig = TokenizerConfig(),
              chat_template: str = "chatml",
              init_from: str | None = None,
              eval_questions: int = 200,
              eval_max_new_tokens: int = 16,
              lora: LoraConfig | None = None) -> SFT:
  """The SFT stage as configured in gin (`sft.data = @SFTDataConfig()`, ...).

  `chat_template`: 'chatml' (Qwen) or 'llama3'. `init_from`: where to start (default: the
  previous stage of this run): an earlier stage's name, or a workdir (a run, or an
  `llmjax-import` output; `'dir:stage'` picks one of its stages). `lora`: train LoRA
  adapters (`@LoraConfig()`; QLoRA with `LoraConfig.quantize_base = @QuantConfig()`) on
  that start instead of every weight.
  """
  chat.get_template(chat_template)
  return SFT(model, data, train, optimizer, tokenizer, chat_template, init_from,
             eval_questions, eval_max_new_tokens, lora)
