"""Stage `rm`: a reward model trained on chosen/rejected pairs (Bradley-Terry), for PPO.

The model is the transformer with a scalar `score` head (`ModelConfig.head = 'score'`)
read at each sequence's last token, as Hugging Face's `*ForSequenceClassification` reads
it. It starts from the previous stage (or `init_from`), usually an SFT model: its body is
copied, its lm_head dropped, the score head initialised fresh. The loss is TRL's
`-log sigmoid(r_chosen - r_rejected - margin)` (+ `center_rewards_coefficient` *
(r_chosen + r_rejected)^2), with a per-pair `margin` from the JSONL when given. Evaluation
reports pairwise accuracy on held-out pairs. With LoRA, the adapters and the score head
train. With `on_policy` (`llmjax.preference.on_policy`), pairs of the start's own sampled
answers, a right one chosen over a wrong one, join the training pairs, and each eval also
reports the accuracy on such pairs of held-out questions (`on_policy/accuracy`): the mistakes
a PPO policy starting from that model makes, which made-up pairs alone do not teach the
reward model to rank. `llmjax-export` writes it as `LlamaForSequenceClassification` /
`Qwen2ForSequenceClassification`; `llmjax.model.reward.score_sequences` scores text in Python.
"""

from __future__ import annotations

import dataclasses

from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax import metrics as metrics_lib
from llmjax.data import chat, preferences
from llmjax.errors import ConfigError
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.model.reward import reward_config, sequence_end_mask
from llmjax.parallel import mesh as mesh_lib
from llmjax.preference import on_policy as on_policy_lib
from llmjax.preference.losses import reward_loss
from llmjax.stages.context import RANDOM_INIT, RunContext, StageOutput, TokenizerConfig
from llmjax.stages.preference_data import PreferenceSplits, answer_items, prepare_pairs
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig


def pair_rewards(model, batch: dict[str, jax.Array], max_pairs: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(chosen, rejected) rewards and validity, each `[rows * max_pairs]`: the score at the last
  token of each pair's two sequences."""
  scores = model(batch["tokens"], batch["positions"], batch["segment_ids"])  # [rows, seq]
  at_end = jnp.where(sequence_end_mask(batch["segment_ids"]), scores, 0.0)
  chosen, rejected = preferences.sequence_sums(at_end, batch, max_pairs)
  valid = preferences.pair_valid(batch, max_pairs)
  return chosen.reshape(-1), rejected.reshape(-1), valid.reshape(-1)


def reward_objective(max_pairs: int, center_rewards_coefficient: float | None = None):
  """The train loop's loss: the mean Bradley-Terry loss over the batch's pairs, with the
  pairwise accuracy, mean margin and rewards as (sum, count) metrics."""
  def loss_fn(model, roles, batch):
    del roles
    r_c, r_r, valid = pair_rewards(model, batch, max_pairs)
    margin, _ = preferences.sequence_sums(batch["margin"], batch, max_pairs)
    per_pair = reward_loss(r_c, r_r, margin=margin.reshape(-1),
                           center_rewards_coefficient=center_rewards_coefficient)
    n = jnp.sum(valid.astype(jnp.float32))
    total = lambda x: jnp.sum(jnp.where(valid, jax.lax.stop_gradient(x), 0.0))
    aux = {"accuracy": (total((r_c > r_r).astype(jnp.float32)), n),
           "margin": (total(r_c - r_r), n),
           "rewards/chosen": (total(r_c), n), "rewards/rejected": (total(r_r), n)}
    return jnp.sum(jnp.where(valid, per_pair, 0.0)), n, aux
  return loss_fn


def on_policy_examples(start: StageOutput, splits: PreferenceSplits,
                       cfg: on_policy_lib.OnPolicyPairs, data: preferences.PreferenceDataConfig,
                       template: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                               dict[str, int]]:
  """(train, eval, counts): tokenized pairs of the start model's own answers to the training
  questions (indexed after `splits.train`'s examples, which they join) and to up to
  `cfg.eval_questions` held-out ones, and what sampling and tokenizing made of them."""
  graphdef, params = start.float_model()
  out, counts = [], {}
  for split, pairs, limit in (("train", splits.train_pairs, len(splits.train_pairs)),
                              ("eval", splits.eval_pairs, cfg.eval_questions)):
    sampled, made = on_policy_lib.sample_pairs(graphdef, params, splits.tokenizer, template,
                                               answer_items(pairs, limit), cfg)
    examples = []
    if sampled:
      examples, stats = preferences.tokenize_pairs(sampled, splits.tokenizer, template,
                                                   data.seq_len, data.overlong)
      made.update(stats.as_dict("tokenized_"))
    out.append(examples)
    counts.update({f"on_policy_{split}_{k}": v for k, v in made.items()})
  train, evals = out
  offset = len(splits.train)
  return [{**ex, "index": offset + ex["index"]} for ex in train], evals, counts


class HeldOutPairs:
  """The reward model's pairwise accuracy and mean margin on extra held-out pairs, logged as
  `{prefix}accuracy` and `{prefix}margin` with every eval (over every process's pairs)."""

  def __init__(self, batches: Sequence[dict[str, np.ndarray]], max_pairs: int, prefix: str,
               mesh, rules):
    self.batches, self.prefix, self.mesh, self.rules = list(batches), prefix, mesh, rules
    self.rows = mesh_lib.batch_sharding(mesh, rules)

    def sums(graphdef, params, batch):
      r_c, r_r, valid = pair_rewards(nnx.merge(graphdef, params), batch, max_pairs)
      return (jnp.sum(valid & (r_c > r_r)), jnp.sum(valid),
              jnp.sum(jnp.where(valid, r_c - r_r, 0.0)))
    self._sums = jax.jit(sums, static_argnums=0, out_shardings=mesh_lib.replicated(mesh))

  def __call__(self, graphdef, params, step: int = 0) -> dict[str, float]:
    del step
    right = n = margin = 0.0
    for batch in self.batches:
      with mesh_lib.activation_sharding(self.mesh, self.rules):
        sums = self._sums(graphdef, params, mesh_lib.host_batch_to_global(batch, self.rows))
      r, c, m = (float(x) for x in jax.device_get(sums))
      right, n, margin = right + r, n + c, margin + m
    if not n:
      return {}
    return {f"{self.prefix}accuracy": right / n, f"{self.prefix}margin": margin / n,
            f"{self.prefix}pairs": int(n)}


@dataclasses.dataclass(frozen=True)
class RewardModel:
  name = "rm"
  model: ModelConfig  # head 'score'
  data: preferences.PreferenceDataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  chat_template: str = "chatml"
  init_from: str | None = None
  center_rewards_coefficient: float | None = None
  lora: LoraConfig | None = None
  on_policy: on_policy_lib.OnPolicyPairs | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    has_start = self.init_from != RANDOM_INIT and bool(self.init_from or ctx.last_stage)
    pairs = prepare_pairs(ctx, self.name, self.data, self.tokenizer, self.model,
                          self.chat_template, has_start=has_start)
    train, counts, extra_eval = pairs.train, dict(pairs.counts), None
    pid, nproc = jax.process_index(), jax.process_count()
    if self.on_policy is not None:
      start = ctx.start(self.init_from, self.model, f"{self.name}.init_from")
      if start is None or start.model_cfg.head != "lm":
        raise ConfigError("rm.on_policy samples answers from the stage's start, which must be "
                          "a language model (usually the sft stage): run rm after one, or set "
                          "rm.init_from to a run or an llmjax-import of one")
      more, evals, made = on_policy_examples(start, pairs, self.on_policy, self.data,
                                             self.chat_template)
      train, counts = train + more, {**counts, **made}
      if evals:
        mesh, rules = mesh_lib.mesh_and_rules(ctx.mesh, ctx.rules)
        every = dataclasses.replace(self.data, eval_batches=len(evals))  # eval_questions caps
        extra_eval = HeldOutPairs(preferences.eval_batches(evals, every, pid, nproc),
                                  self.data.max_pairs_per_row, "on_policy/", mesh, rules)
    train_ds = preferences.train_batches(train, self.data, pid, nproc)
    eval_data = preferences.eval_batches(pairs.eval, self.data, pid, nproc)
    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, counts, kind="data")
      meta = {"tokenizer": ctx.tokenizer_file(), "chat_template_name": self.chat_template,
              "chat_template": chat.chat_template_jinja(self.chat_template), **start_meta}
      return loop.train(stage=self.name, policy=policy,
                        loss_fn=reward_objective(self.data.max_pairs_per_row,
                                                 self.center_rewards_coefficient),
                        train_data=train_ds, eval_data=eval_data, train_cfg=self.train,
                        opt_cfg=self.optimizer, writer=writer, meta=meta,
                        extra_eval=extra_eval, **ctx.loop_kwargs())
    finally:
      writer.close()


@gin.configurable("rm")
def reward_model_stage(model: ModelConfig = gin.REQUIRED,
                       data: preferences.PreferenceDataConfig = gin.REQUIRED,
                       train: loop.TrainConfig = gin.REQUIRED,
                       optimizer: OptimizerConfig = OptimizerConfig(),
                       tokenizer: TokenizerConfig = TokenizerConfig(),
                       chat_template: str = "chatml",
                       init_from: str | None = None,
                       center_rewards_coefficient: float | None = None,
                       lora: LoraConfig | None = None,
                       on_policy: on_policy_lib.OnPolicyPairs | None = None) -> RewardModel:
  """The reward-model stage as configured in gin (`rm.data = @PreferenceDataConfig()`, ...).

  `model`: the language model's config (the stage gives it the score head). `init_from`:
  where to start (default: the previous stage). `center_rewards_coefficient`: TRL's
  penalty on rewards away from 0 (e.g. 0.01). `lora`: train adapters and the head.
  `on_policy`: also train on pairs of the start's own sampled answers (`@OnPolicyPairs()`).
  """
  chat.get_template(chat_template)
  if center_rewards_coefficient is not None and center_rewards_coefficient < 0:
    raise ConfigError(f"rm.center_rewards_coefficient={center_rewards_coefficient}: use None "
                      "or a value >= 0 (0.01 is usual)")
  return RewardModel(reward_config(model), data, train, optimizer, tokenizer, chat_template,
                     init_from, center_rewards_coefficient, lora, on_policy)
