"""Stage `ppo`: RLHF, the policy improved by PPO against a frozen reward model.

Four roles (Ouyang et al. 2022, as TRL's PPOTrainer): the policy (from the previous stage,
usually `sft`), a frozen reference (the start; with LoRA, the base with adapters off), a frozen
reward model (`ppo.reward_from`: an `rm` stage of this run, another run, or an HF
`...ForSequenceClassification` import) and a trainable value model: a separate score-head
model started from the reward model or from the policy's body (`value_model='separate'`), or a
value head on the policy's own trunk (`'shared'`).

Each rollout samples one completion per prompt from the current policy with our Sampler; one
jitted program on the run's mesh (`PPORollout`) then computes the policy's and reference's
log-probs, the values and the reward model's score of prompt + completion as the chat
template renders the conversation (after an end-of-turn token, what the template puts after
it: ChatML's '\n'), read at its last token, where the rm stage trains it; turns them into
per-token rewards (-kl_coef x KL + the score on the completion's last token, where TRL puts it
one position later, see `llmjax.rl.ppo`; a missing-EOS penalty), GAE advantages whitened over
the batch, and returns. The
rollout then feeds `num_ppo_epochs` x `num_mini_batches` optimizer steps of the clipped
surrogate plus `vf_coef` x the clipped value loss. An adaptive KL controller (Ziegler et al.
2019) moves kl_coef toward `target_kl`, its state checkpointed with the rollout source.

Every eval answers held-out prompts greedily: the reward model's mean score of the answers and,
where the prompts have reference answers, their exact match.
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
from llmjax.data import chat, prompts as prompts_lib
from llmjax.errors import ConfigError
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.model.reward import ValueHead, end_scores, init_reward_model, reward_config
from llmjax.parallel import distributed, mesh as mesh_lib
from llmjax.rl import ppo as ppo_lib
from llmjax.rl.rewards import reference_match
from llmjax.rl.rollouts import Finish, RolloutConfig, RolloutSource, training_rows
from llmjax.runs.load import has_checkpoint
from llmjax.sample.sampler import Sampler, sample_per_process
from llmjax.stages.context import RunContext, TokenizerConfig
from llmjax.train import loop, roles as roles_lib
from llmjax.train.losses import target_logps
from llmjax.train.optimizer import OptimizerConfig

VALUE_MODELS = ("separate", "shared")
VALUE_FROM = ("reward", "policy")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """Sampling, rewards and losses of the ppo stage (TRL's PPOConfig names and defaults).

  Attributes:
    max_new_tokens: the completion budget (TRL's response_length).
    temperature, top_k, top_p: sampling (top_k 0 and top_p 1.0: no limit).
    kl_coef, kl_estimator: the KL penalty -kl_coef x KL(policy || reference) per token;
      'k1' (TRL's default), 'k2' or 'k3'.
    target_kl, kl_horizon: an adaptive KL controller (Ziegler et al. 2019) moving kl_coef so
      the rollouts' KL per completion tracks target_kl; None keeps kl_coef fixed.
    missing_eos_penalty: subtracted from the score of completions that hit the budget
      without a stop token (None: none).
    whiten_rewards: scale the per-token rewards by their std over the batch.
    gamma, lam: GAE's discount and lambda.
    cliprange, cliprange_value: the policy ratio's and the value's clip ranges.
    vf_coef: the value loss's weight. entropy_coef: an entropy bonus (0: none).
    num_ppo_epochs, num_mini_batches: passes over each rollout, and optimizer steps per pass.
    value_model: 'separate' (its own transformer) or 'shared' (a head on the policy's trunk,
      whose value loss gradient also trains the trunk).
    value_from: where a separate value model starts: 'reward' (the reward model, TRL's
      default) or 'policy' (the policy's body and a fresh head).
    eval_max_new_tokens: the budget of the greedy held-out answers.
  """
  max_new_tokens: int = 53
  temperature: float = 0.7
  top_k: int = 0
  top_p: float = 1.0
  kl_coef: float = 0.05
  kl_estimator: str = "k1"
  target_kl: float | None = None
  kl_horizon: int = 10000
  missing_eos_penalty: float | None = None
  whiten_rewards: bool = False
  gamma: float = 1.0
  lam: float = 0.95
  cliprange: float = 0.2
  cliprange_value: float | None = 0.2
  vf_coef: float = 0.1
  entropy_coef: float = 0.0
  num_ppo_epochs: int = 4
  num_mini_batches: int = 1
  value_model: str = "separate"
  value_from: str = "reward"
  eval_max_new_tokens: int | None = None

  def __post_init__(self):
    name = "PPOConfig"
    for field, allowed in (("kl_estimator", ppo_lib.KL_KINDS), ("value_model", VALUE_MODELS),
                           ("value_from", VALUE_FROM)):
      if getattr(self, field) not in allowed:
        raise ConfigError(f"{name}.{field}={getattr(self, field)!r}: use one of {allowed}")
    if self.max_new_tokens < 1 or self.num_ppo_epochs < 1 or self.num_mini_batches < 1:
      raise ConfigError(f"{name} needs max_new_tokens, num_ppo_epochs and num_mini_batches "
                        ">= 1")
    if self.kl_coef < 0 or self.vf_coef < 0 or self.entropy_coef < 0:
      raise ConfigError(f"{name}: kl_coef, vf_coef and entropy_coef must be >= 0")
    if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
      raise ConfigError(f"{name}: gamma={self.gamma} and lam={self.lam} must lie in [0, 1]")
    if self.target_kl is not None and (self.target_kl <= 0 or self.kl_horizon < 1):
      raise ConfigError(f"{name}.target_kl={self.target_kl} must be > 0 (or None for a fixed "
                        f"kl_coef) with kl_horizon >= 1")
    if self.cliprange <= 0 or (self.cliprange_value is not None and self.cliprange_value <= 0):
      raise ConfigError(f"{name}: cliprange and cliprange_value must be > 0 (cliprange_value "
                        "None: no value clipping)")


def _values(cfg: PPOConfig, value_model, hidden, batch) -> jax.Array:
  """V(s_t) `[rows, seq]`: the value of the state before each target token."""
  if cfg.value_model == "shared":
    return value_model(hidden)
  return value_model(batch["tokens"], batch["positions"], batch["segment_ids"])


def reward_scores(reward_model, batch: dict[str, jax.Array],
                  after_reply: tuple[int, tuple[int, ...]] = (-1, ())) -> jax.Array:
  """`[rows]` reward-model scores of each row's conversation, read at its last token.

  The conversation is prompt + completion and, when the completion ends with the chat
  template's end-of-turn token, what the template renders after it (`chat.after_reply`:
  ChatML's '\n' after <|im_end|>): the sequence the rm stage trains on, as the template renders
  it, so the score is read where the reward model learned to give it (read at <|im_end|>
  instead, the tiny RLHF recipe's reward model ranked held-out pairs 0.61 right, not 0.83).
  A completion cut by the token budget is read at its last token. The rows' inputs stop one
  token short (the last token is only a target), so the sequence is rebuilt as the first
  input followed by the targets.
  """
  full = jnp.concatenate([batch["tokens"][:, :1], batch["targets"]], axis=1)
  lengths = jnp.sum(batch["segment_ids"] > 0, axis=1) + 1
  end_id, after = after_reply
  if after:
    last = jnp.take_along_axis(full, (lengths - 1)[:, None], axis=1)[:, 0]
    ended = (last == end_id)[:, None]
    full = jnp.pad(full, ((0, 0), (0, len(after))))
    column = jnp.arange(full.shape[1])[None, :]
    for k, token in enumerate(after):
      full = jnp.where(ended & (column == lengths[:, None] + k), token, full)
    lengths = lengths + jnp.where(ended[:, 0], len(after), 0)
  return end_scores(reward_model, full, lengths)


class PPORollout(Finish):
  """Scores a rollout on device and fills in what PPO trains with: `old_logps`, `old_values`,
  `advantages` and `returns` (`[rows, seq]`), with the adaptive kl_coef as its state."""

  def __init__(self, cfg: PPOConfig, mesh, rules,
               after_reply: tuple[int, tuple[int, ...]] = (-1, ()), chunk_size: int = 0):
    self.cfg, self.mesh, self.rules, self.after_reply = cfg, mesh, rules, after_reply
    self.chunk_size = chunk_size  # TrainConfig.loss_chunk_size, as the loss
    self.kl_coef = cfg.kl_coef
    self.rows = mesh_lib.batch_sharding(mesh, rules)
    self._fn = jax.jit(self._compute, static_argnums=0,
                       out_shardings=(self.rows, mesh_lib.replicated(mesh)))

  def _compute(self, graphdefs, params, batch, kl_coef):
    cfg = self.cfg
    models = {name: nnx.merge(gd, params[name]) for name, gd in graphdefs}
    policy = models[roles_lib.POLICY]
    hidden, logps, entropy = target_logps(policy, batch, cfg.max_new_tokens, self.chunk_size)
    refs = {k: v for k, v in models.items() if k == roles_lib.REFERENCE}
    ref_logps = target_logps(roles_lib.reference_model(policy, refs), batch,
                             cfg.max_new_tokens, self.chunk_size)[1]
    values = _values(cfg, models[roles_lib.VALUE], hidden, batch)
    scores = reward_scores(models[roles_lib.REWARD], batch, self.after_reply)
    mask = batch["loss_mask"].astype(jnp.float32)
    kl = ppo_lib.kl_penalty(logps, ref_logps, cfg.kl_estimator) * mask
    rewards = ppo_lib.token_rewards(scores, kl, mask, kl_coef=kl_coef,
                                    eos_seen=batch["stopped"] > 0,
                                    missing_eos_penalty=cfg.missing_eos_penalty,
                                    whiten=cfg.whiten_rewards)
    advantages, returns = ppo_lib.gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    advantages = ppo_lib.masked_whiten(advantages, mask)
    has_tokens = (mask.sum(1) > 0).astype(jnp.float32)
    n = jnp.maximum(has_tokens.sum(), 1.0)
    metrics = {
        "score": jnp.sum(scores * has_tokens) / n,
        "kl": jnp.sum(kl) / n,  # per completion, as TRL's objective/kl
        "non_score_reward": -kl_coef * jnp.sum(kl) / n,
        "entropy": ppo_lib.masked_mean(entropy, mask),
        "value_mean": ppo_lib.masked_mean(values, mask),
        "explained_variance": ppo_lib.explained_variance(values, returns, mask),
        "kl_coef": jnp.asarray(kl_coef, jnp.float32),
    }
    arrays = {"old_logps": logps, "old_values": values, "advantages": advantages,
              "returns": returns}
    return arrays, metrics

  def __call__(self, view, groups, batch):
    del groups
    names = tuple(sorted([(roles_lib.POLICY, view.graphdef)] +
                         [(k, gd) for k, (gd, _) in view.roles.items()], key=lambda x: x[0]))
    params = {roles_lib.POLICY: view.params, **{k: p for k, (_, p) in view.roles.items()}}
    keys = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "stopped")
    inputs = mesh_lib.host_batch_to_global({k: batch[k] for k in keys}, self.rows)
    with mesh_lib.activation_sharding(self.mesh, self.rules):
      arrays, metrics = self._fn(names, params, inputs, jnp.float32(self.kl_coef))
    for k, v in arrays.items():
      batch[k] = np.asarray(mesh_lib.global_to_host_rows(v, self.rows), np.float32)
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if self.cfg.target_kl is not None:
      completions = len(batch["tokens"]) * jax.process_count()
      self.kl_coef = float(ppo_lib.adaptive_kl_update(
          self.kl_coef, metrics["kl"], completions, target=self.cfg.target_kl,
          horizon=self.cfg.kl_horizon))
    return metrics

  def get_state(self):
    return {"kl_coef": self.kl_coef}

  def set_state(self, state):
    self.kl_coef = float(state.get("kl_coef", self.cfg.kl_coef))


def ppo_objective(cfg: PPOConfig, chunk_size: int = 0):
  """The train loop's loss: clipped surrogate + vf_coef x clipped value loss, token-weighted
  (TRL's masked means over a minibatch), as (sum, weight) so microbatches add up exactly.
  `chunk_size` (`TrainConfig.loss_chunk_size`): the completion window's output layer runs
  over that many positions at a time (`llmjax.train.losses.target_logps`)."""
  def loss_fn(policy, roles, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    hidden, logps, entropy = target_logps(policy, batch, cfg.max_new_tokens, chunk_size)
    values = _values(cfg, roles[roles_lib.VALUE], hidden, batch)
    pg, pg_metrics = ppo_lib.ppo_policy_loss(
        logps, batch["old_logps"], batch["advantages"], mask, cliprange=cfg.cliprange,
        entropies=entropy, entropy_coef=cfg.entropy_coef)
    vf, vf_metrics = ppo_lib.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                            cliprange_value=cfg.cliprange_value)
    tokens = jnp.maximum(mask.sum(), 1.0)
    loss = pg + cfg.vf_coef * vf
    aux = {"policy_loss": (pg_metrics["pg_loss"] * tokens, tokens),
           "value_loss": (vf * tokens, tokens),
           "clipfrac": (pg_metrics["clipfrac"] * tokens, tokens),
           "approxkl": (pg_metrics["approxkl"] * tokens, tokens),
           "vf_clipfrac": (vf_metrics["vf_clipfrac"] * tokens, tokens),
           "entropy": (jnp.sum(jax.lax.stop_gradient(entropy) * mask), tokens)}
    fresh = mask * batch["fresh"][:, None]
    gap = jnp.abs(jax.lax.stop_gradient(logps) - batch["sampler_logps"]) * fresh
    aux["logprob_gap"] = (jnp.sum(gap), jnp.sum(fresh))
    return loss * tokens, tokens, aux
  return loss_fn


def value_head_role(cfg: ModelConfig, seed: int) -> roles_lib.Role:
  """A trainable value head on the policy's hidden states (`value_model='shared'`)."""
  return roles_lib.Role(lambda _: ValueHead(cfg, seed), None, nnx.Param, None)


class HeldOut:
  """Greedy answers to held-out prompts: the reward model's mean score of them and, where the
  prompts have reference answers, the fraction right (`reference_match`: exact match for text
  answers, `math_answer` for numbers). Every process passes its share; the figures cover all."""

  def __init__(self, reward, tokenizer, template: str, items: Sequence[dict[str, Any]],
               max_new_tokens: int, seq_len: int, mesh, rules):
    self.tokenizer, self.template, self.items = tokenizer, template, list(items)
    self.max_new_tokens, self.seq_len = max_new_tokens, seq_len
    self.rows = mesh_lib.batch_sharding(mesh, rules)
    graphdef, params = reward.float_model()
    self.reward_graphdef = graphdef
    self.reward_params = jax.jit(
        lambda p: p, out_shardings=mesh_lib.param_shardings(params, mesh, rules))(params)
    self.mesh, self.rules = mesh, rules
    after = chat.after_reply(tokenizer, template)
    self._score = jax.jit(lambda gd, p, b: reward_scores(nnx.merge(gd, p), b, after),
                          static_argnums=0, out_shardings=self.rows)

  def __call__(self, graphdef, params, step=0) -> dict[str, float]:
    del step
    if not self.items:
      return {}
    sampler = Sampler(graphdef, params, self.tokenizer,
                      eos_ids=chat.stop_token_ids(self.tokenizer, self.template))
    prompts = [it["prompt_ids"] for it in self.items]
    out = sample_per_process(sampler, prompts, max_new_tokens=self.max_new_tokens)
    rows = training_rows(prompts, out.tokens, out.lengths, self.seq_len)
    keys = ("tokens", "targets", "segment_ids")
    with mesh_lib.activation_sharding(self.mesh, self.rules):
      scores = self._score(self.reward_graphdef, self.reward_params,
                           mesh_lib.host_batch_to_global({k: rows[k] for k in keys}, self.rows))
    scores = mesh_lib.global_to_host_rows(scores, self.rows)
    right, judged = 0.0, 0.0
    for i, it in enumerate(self.items):
      answer = it.get("answer")
      if answer is None:
        continue
      judged += 1
      right += reference_match(out.texts[i][0], answer)
    total_score, n, right, judged = distributed.gather_floats(
        [float(scores.sum()), len(self.items), right, judged]).sum(axis=0)
    result = {"rm_score": float(total_score / n), "rm_score_n": int(n)}
    if judged:
      result.update({"exact_match": float(right / judged), "exact_match_n": int(judged)})
    return result


@dataclasses.dataclass(frozen=True)
class PPO:
  name = "ppo"
  model: ModelConfig
  data: prompts_lib.PromptDataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  ppo: PPOConfig
  chat_template: str = "chatml"
  init_from: str | None = None
  reference_from: str | None = None
  reward_from: str = "rm"
  lora: LoraConfig | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    cfg = self.ppo
    start = ctx.start(self.init_from, self.model, f"{self.name}.init_from")
    if start is None:
      raise ConfigError("ppo needs a trained policy to start from (usually the sft stage): run "
                        "it after one, or set ppo.init_from to a run or an llmjax-import")
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    tokenizer = ctx.ensure_tokenizer(self.tokenizer, [], self.model, self.name, has_start=True)
    reward = ctx.resolve(self.reward_from, f"{self.name}.reward_from")
    if reward.model_cfg.head != "score":
      raise ConfigError(f"ppo.reward_from={self.reward_from!r} is a language model (head "
                        f"{reward.model_cfg.head!r}), not a reward model: name an `rm` stage, "
                        "a run of one, or an llmjax-import of a ...ForSequenceClassification")
    ctx.check_same_vocabulary(reward, self.model, f"{self.name}.reward_from")
    template = self.chat_template
    stop_ids = chat.stop_token_ids(tokenizer, template)
    train_ex, eval_ex, stats = prompts_lib.prompt_data(self.data, tokenizer, template)

    roles: dict[str, roles_lib.Role] = {roles_lib.REWARD: reward.frozen_role()}
    ref = (ctx.resolve(self.reference_from, f"{self.name}.reference_from")
           if self.reference_from else start if self.lora is None else None)
    if ref is not None:
      roles[roles_lib.REFERENCE] = ref.frozen_role()
    if cfg.value_model == "shared":
      roles[roles_lib.VALUE] = value_head_role(self.model, self.train.seed + 1)
    else:
      value_cfg = reward_config(self.model)
      init = (reward.float_params() if cfg.value_from == "reward" else
              init_reward_model(start.float_params(), value_cfg, self.train.seed + 1))
      if cfg.value_from == "reward":
        from llmjax.checkpoint import check_same_model
        check_same_model(dataclasses.asdict(reward.model_cfg), value_cfg,
                         f"{self.name}.reward_from (the value model starts from it; with "
                         "another shape, set PPOConfig.value_from='policy')")
      roles[roles_lib.VALUE] = roles_lib.policy_role(value_cfg, init, self.lora,
                                                     self.train.seed + 1)

    mesh, rules = mesh_lib.mesh_and_rules(ctx.mesh, ctx.rules)
    pid, nproc = jax.process_index(), jax.process_count()
    seq_len = self.data.max_prompt_tokens + cfg.max_new_tokens
    rollout_cfg = RolloutConfig(1, cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p,
                                cfg.num_ppo_epochs, False, seq_len, self.train.seed,
                                minibatches=cfg.num_mini_batches)
    source = RolloutSource(prompts_lib.PromptIterator(train_ex, self.data, pid, nproc),
                           lambda gd, p: Sampler(gd, p, tokenizer, eos_ids=stop_ids), (),
                           rollout_cfg,
                           PPORollout(cfg, mesh, rules, chat.after_reply(tokenizer, template),
                                      self.train.loss_chunk_size))
    eval_budget = cfg.eval_max_new_tokens or cfg.max_new_tokens
    held_out = HeldOut(reward, tokenizer, template,
                       prompts_lib.eval_prompts(eval_ex, self.data, pid, nproc), eval_budget,
                       self.data.max_prompt_tokens + eval_budget, mesh, rules)
    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, stats.as_dict(), kind="data")
      if held_out.items and not has_checkpoint(ctx.workdir, self.name):
        # The start's held-out figures: what the eval records are compared with.
        writer.write(0, held_out(*start.float_model()), kind="baseline")
      meta = {"tokenizer": ctx.tokenizer_file(), "chat_template_name": template,
              "chat_template": chat.chat_template_jinja(template), **start_meta}
      return loop.train(stage=self.name, policy=policy, roles=roles,
                        loss_fn=ppo_objective(cfg, self.train.loss_chunk_size),
                        train_data=source, eval_data=[],
                        train_cfg=self.train, opt_cfg=self.optimizer, writer=writer,
                        meta=meta, extra_eval=held_out if held_out.items else None,
                        **ctx.loop_kwargs())
    finally:
      writer.close()


@gin.configurable("ppo")
def ppo_stage(model: ModelConfig = gin.REQUIRED,
              data: prompts_lib.PromptDataConfig = gin.REQUIRED,
              train: loop.TrainConfig = gin.REQUIRED,
              optimizer: OptimizerConfig = OptimizerConfig(),
              tokenizer: TokenizerConfig = TokenizerConfig(),
              ppo: PPOConfig = PPOConfig(),
              chat_template: str = "chatml",
              init_from: str | None = None,
              reference_from: str | None = None,
              reward_from: str = "rm",
              lora: LoraConfig | None = None) -> PPO:
  """The PPO stage as configured in gin (`ppo.data = @PromptDataConfig()`, `ppo.ppo =
  @PPOConfig()`, ...). `init_from`: the policy's start (default: the previous stage);
  `reference_from`: the KL reference (default: the start; with LoRA, the base with adapters
  off); `reward_from`: the reward model (default: this run's `rm` stage)."""
  chat.get_template(chat_template)
  if data.prompts_per_step % (ppo.num_mini_batches * train.grad_accum_steps):
    raise ConfigError(f"ppo: PromptDataConfig.prompts_per_step={data.prompts_per_step} "
                      f"completions do not split into PPOConfig.num_mini_batches="
                      f"{ppo.num_mini_batches} minibatches of TrainConfig.grad_accum_steps="
                      f"{train.grad_accum_steps} microbatches each")
  return PPO(model, data, train, optimizer, tokenizer, ppo, chat_template, init_from,
             reference_from, reward_from, lora)
