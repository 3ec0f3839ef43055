"""Stage `distill`: a frozen teacher's next-token distributions taught to a trainable student.

The teacher (`teacher_from`: a finished stage of this run, another run, or an
`llmjax-import`) may have any size but must share the student's tokenizer and vocabulary: a
mismatch is refused, naming both. It is held on the run's mesh beside the student, frozen (no
gradient, no optimizer state, never checkpointed), in bfloat16 unless
`DistillConfig.teacher_dtype` says otherwise. The student starts like any stage
(`init_from`: the previous stage, an earlier one, a run or an import; `'random'` for a fresh
init) and may train LoRA adapters (`lora`).

The data is SFT's (`SFTDataConfig`: conversations rendered with the chat template, packed
whole, trained on the replies). The loss is `llmjax.distill.losses.distill_loss`: alpha x the
next-token CE + (1 - alpha) x TRL's generalized JSD (beta 0 forward KL, 1 reverse KL) at
temperature T (scaled by T^2), over the reply tokens, optionally over the teacher's top-k
tokens, chunked over positions (`TrainConfig.loss_chunk_size`). A fraction `lmbda` of steps
is on-policy (GKD): the student samples its own replies to that batch's prompts from its
current parameters and the teacher scores them (`llmjax.distill.batches`). Sampled rows have
no reference reply, so the CE term (and the CE metrics) skip them: their tokens count
(1 - alpha) x JSD only.

Logged: `jsd`, `ce` (the student's CE on reference replies), `teacher_ce`, the fraction of
on-policy steps and their sampling speed; each eval adds the student's held-out CE (`ce` of
the eval record: its eval loss), greedy exact match on held-out questions, and both models'
forward tokens/s on one eval batch. The teacher's own exact match is written once as the
`baseline` record at step 0.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import metrics as metrics_lib
from llmjax.data import chat, instructions
from llmjax.data.tokenizer import same_vocabulary
from llmjax.distill import losses
from llmjax.distill.batches import DistillBatches
from llmjax.errors import ConfigError
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.model.transformer import build_model
from llmjax.runs.load import has_checkpoint
from llmjax.sample.sampler import Sampler
from llmjax.stages.context import RunContext, StageOutput, TokenizerConfig
from llmjax.stages.sft import exact_match
from llmjax.train import loop, roles as roles_lib
from llmjax.train.optimizer import OptimizerConfig

TEACHER = "teacher"
TEACHER_DTYPES = (None, "float32", "bfloat16")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """The divergence, its mix with CE, on-policy sampling and the teacher's precision.

  Attributes:
    beta: 0 forward KL(teacher || student), 1 reverse KL(student || teacher), between: the
      generalized JSD (GKD/TRL's beta; TRL GKD's default 0.5).
    temperature: T dividing both models' logits; the divergence is scaled by T^2.
    alpha: the next-token CE's weight (the divergence gets 1 - alpha); 0 is pure
      distillation (TRL's GKD), 1 is plain SFT with a teacher that only logs.
    top_k, top_k_tail: 0 compares whole vocabularies; k > 0 only the teacher's k likeliest
      tokens (plus one bucket for the rest when `top_k_tail`).
    lmbda: the fraction of steps whose replies the student samples itself (GKD's lambda;
      TRL GKD's default 0.5); 0 is off-policy distillation on the data's replies.
    max_new_tokens, sampling_temperature, sampling_top_k, sampling_top_p: how on-policy
      replies are sampled (TRL GKD: max_new_tokens 128, temperature 0.9).
    teacher_dtype: 'bfloat16' (the default: half the teacher's memory, its forward in bf16),
      'float32', or None to keep the teacher's own config.
  """
  beta: float = 0.5
  temperature: float = 1.0
  alpha: float = 0.0
  top_k: int = 0
  top_k_tail: bool = True
  lmbda: float = 0.0
  max_new_tokens: int = 128
  sampling_temperature: float = 0.9
  sampling_top_k: int = 0
  sampling_top_p: float = 1.0
  teacher_dtype: str | None = "bfloat16"

  def __post_init__(self):
    losses.check_settings("DistillConfig", beta=self.beta, temperature=self.temperature,
                          top_k=self.top_k, alpha=self.alpha)
    if not 0.0 <= self.lmbda <= 1.0:
      raise ConfigError(f"DistillConfig.lmbda={self.lmbda}: the on-policy fraction must lie "
                        "in [0, 1] (0 off-policy only)")
    if self.teacher_dtype not in TEACHER_DTYPES:
      raise ConfigError(f"DistillConfig.teacher_dtype={self.teacher_dtype!r}: use one of "
                        f"{TEACHER_DTYPES}")
    if self.max_new_tokens < 1 or self.sampling_temperature < 0:
      raise ConfigError("DistillConfig needs max_new_tokens >= 1 and sampling_temperature >= 0")


def distill_objective(cfg: DistillConfig, chunk_size: int = 0) -> loop.LossFn:
  """The train loop's loss: `distill_loss` of the policy against the `teacher` role, with
  rows marked `sampled` (on-policy) kept out of the CE term."""
  def loss_fn(policy, roles, batch):
    sampled = batch.get("sampled")
    loss, count, aux = losses.distill_loss(
        policy, roles[TEACHER], batch, beta=cfg.beta, temperature=cfg.temperature,
        alpha=cfg.alpha, chunk_size=chunk_size, top_k=cfg.top_k, top_k_tail=cfg.top_k_tail,
        reference_rows=None if sampled is None else 1.0 - sampled)
    return loss, count, aux
  return loss_fn


def check_teacher(student_cfg: ModelConfig, teacher: StageOutput, tokenizer: Any,
                  teacher_from: str) -> None:
  """ConfigError, naming both, unless the teacher shares the student's vocabulary and
  tokenizer (distillation compares distributions over the same token ids)."""
  t_cfg = teacher.model_cfg
  if t_cfg.head != "lm":
    raise ConfigError(f"distill.teacher_from = {teacher_from!r} is a {t_cfg.head!r}-head model "
                      "(a reward model): the teacher must be a language model")
  if t_cfg.vocab_size != student_cfg.vocab_size:
    raise ConfigError(f"distill: the teacher ({teacher_from!r}) has a {t_cfg.vocab_size}-token "
                      f"vocabulary and the student {student_cfg.vocab_size}: distillation "
                      "compares the same token ids; use a teacher with the student's tokenizer")
  t_tok = teacher.tokenizer
  if t_tok is not None and tokenizer is not None and not same_vocabulary(t_tok, tokenizer):
    raise ConfigError(f"distill: the teacher's tokenizer ({teacher_from!r}: {t_tok!r}) differs "
                      f"from the student's ({tokenizer!r}): the same id would be another "
                      "token; use a teacher trained with the student's tokenizer")


def teacher_role(teacher: StageOutput, dtype: str | None) -> roles_lib.Role:
  """The teacher as a frozen role: its plain float model, cast to `dtype` (params and compute)."""
  graphdef, params = teacher.float_model()
  cfg = teacher.model_cfg
  if dtype is not None and (cfg.dtype, cfg.param_dtype) != (dtype, dtype):
    cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
    target = jnp.dtype(dtype)
    params = jax.tree.map(
        lambda x: x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  return roles_lib.Role.frozen(graphdef, params, cfg)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens, positions, segment_ids):
  return nnx.merge(graphdef, params)(tokens, positions, segment_ids)


def forward_tokens_per_sec(graphdef: nnx.GraphDef, params: Any, batch: dict[str, Any]) -> float:
  """Tokens/s of one forward pass (hidden states and logits) on `batch` (compiled once per
  model and shape, then timed)."""
  args = (graphdef, params, batch["tokens"], batch["positions"], batch["segment_ids"])
  jax.block_until_ready(_forward(*args))
  start = time.time()
  jax.block_until_ready(_forward(*args))
  return batch["tokens"].size / max(time.time() - start, 1e-9)


@dataclasses.dataclass(frozen=True)
class Distill:
  name = "distill"
  model: ModelConfig
  data: instructions.SFTDataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  distill: DistillConfig
  teacher_from: str
  chat_template: str = "chatml"
  init_from: str | None = None
  eval_questions: int = 200
  eval_max_new_tokens: int = 16
  lora: LoraConfig | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    cfg = self.distill
    chat.get_template(self.chat_template)
    start = ctx.start(self.init_from, self.model, f"{self.name}.init_from")
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    train_convs, eval_convs, skipped = instructions.conversations(self.data)
    texts = [chat.render_text(c, self.chat_template) for c in train_convs]
    if self.tokenizer.path or start is not None:
      # The student's own tokenizer first: a teacher from elsewhere must match it, not set it.
      ctx.ensure_tokenizer(self.tokenizer, texts, self.model, self.name,
                           has_start=start is not None)
    teacher = ctx.resolve(self.teacher_from, f"{self.name}.teacher_from")
    # A fresh student without a tokenizer of its own takes the teacher's.
    tokenizer = ctx.ensure_tokenizer(self.tokenizer, texts, self.model, self.name,
                                     has_start=start is not None)
    check_teacher(self.model, teacher, tokenizer, self.teacher_from)
    stop_ids = chat.stop_token_ids(tokenizer, self.chat_template)
    train_ex, eval_ex, counts = instructions.tokenize_splits(
        train_convs, eval_convs, skipped, tokenizer, self.chat_template, self.data)
    pid, nproc = jax.process_index(), jax.process_count()
    source = DistillBatches(
        instructions.train_batches(train_ex, self.data, pid, nproc),
        lambda graphdef, params: Sampler(graphdef, params, tokenizer, eos_ids=stop_ids),
        lmbda=cfg.lmbda, seed=self.train.seed, max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.sampling_temperature, top_k=cfg.sampling_top_k,
        top_p=cfg.sampling_top_p)
    eval_data = instructions.eval_batches(eval_ex, self.data, pid, nproc)
    items = instructions.reference_items(eval_convs)[:self.eval_questions]
    t_role = teacher_role(teacher, cfg.teacher_dtype)
    t_graphdef = nnx.split(nnx.eval_shape(lambda: t_role.build(t_role.init)))[0]

    def extra_eval(graphdef, params, step):
      del step
      record = exact_match(graphdef, params, tokenizer, self.chat_template, items,
                           self.eval_max_new_tokens)
      if eval_data:
        record["student_forward_tokens_per_sec"] = forward_tokens_per_sec(
            graphdef, params, eval_data[0])
        record["teacher_forward_tokens_per_sec"] = forward_tokens_per_sec(
            t_graphdef, t_role.init, eval_data[0])
      return record

    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, counts, kind="data")
      if items and not has_checkpoint(ctx.workdir, self.name):
        # The teacher's held-out answers: what the student's eval records are compared with.
        answers = exact_match(*teacher.float_model(), tokenizer, self.chat_template, items,
                              self.eval_max_new_tokens)
        writer.write(0, {f"teacher_{k}": v for k, v in answers.items()}, kind="baseline")
      meta = {"tokenizer": ctx.tokenizer_file(), "chat_template_name": self.chat_template,
              "chat_template": chat.chat_template_jinja(self.chat_template),
              "teacher": teacher.source, **start_meta}
      return loop.train(stage=self.name, policy=policy, roles={TEACHER: t_role},
                        loss_fn=distill_objective(cfg, self.train.loss_chunk_size),
                        train_data=source, eval_data=eval_data, train_cfg=self.train,
                        opt_cfg=self.optimizer, writer=writer, meta=meta,
                        extra_eval=extra_eval, **ctx.loop_kwargs())
    finally:
      writer.close()


@gin.configurable("distill")
def distill_stage(model: ModelConfig = gin.REQUIRED,
                  data: instructions.SFTDataConfig = gin.REQUIRED,
                  train: loop.TrainConfig = gin.REQUIRED,
                  teacher_from: str = gin.REQUIRED,
                  optimizer: OptimizerConfig = OptimizerConfig(),
                  tokenizer: TokenizerConfig = TokenizerConfig(),
                  distill: DistillConfig = DistillConfig(),
                  chat_template: str = "chatml",
                  init_from: str | None = None,
                  eval_questions: int = 200,
                  eval_max_new_tokens: int = 16,
                  lora: LoraConfig | None = None) -> Distill:
  """The distill stage as configured in gin (`distill.teacher_from = 'sft'`,
  `distill.distill = @DistillConfig()`, ...).

  `model`: the student's config. `teacher_from`: an earlier stage of this run, or a workdir
  (a run or an `llmjax-import`; `'dir:stage'` picks one of its stages). `init_from`: the
  student's start (default: the previous stage; `'random'`: a fresh init of `model`).
  `lora`: train LoRA adapters on that start.
  """
  chat.get_template(chat_template)
  if not teacher_from:
    raise ConfigError("distill.teacher_from is empty: name the teacher (a stage of this run, "
                      "a workdir or an llmjax-import)")
  return Distill(model, data, train, optimizer, tokenizer, distill, teacher_from,
                 chat_template, init_from, eval_questions, eval_max_new_tokens, lora)
