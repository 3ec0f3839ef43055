"""Stage `grpo`: reinforcement learning with verifiable rewards (GRPO and its family).

Each rollout takes B prompts (`PromptDataConfig.prompts_per_step`), samples G completions
each with `llmjax.sample.Sampler` from the current parameters, scores them with the
configured rewards (e.g. `math_answer`: the final answer checked, not judged), turns the
rewards into advantages (group-normalised as GRPO, or leave-one-out as RLOO) and takes
`steps_per_generation` x `num_iterations` optimizer steps on it (one minibatch of the
shuffled rows per step, all of them `num_iterations` times) with the clipped policy loss of
`llmjax.rl.policy_loss` (loss types grpo, bnpo, dr_grpo, dapo; clip-higher; GSPO's sequence
ratio; a k3 KL to the reference when beta > 0). The batch source is checkpointed, so a
resumed run samples what the straight run would have. With several processes, each brings
its own prompts and the sampling runs as one program over all devices.

Every logged step has the rollout's rewards (per function), the fraction of groups whose
rewards are all equal (no learning signal), completion lengths, the truncated fraction,
rollout seconds and tokens/s, and the loss's clip fractions, KL and entropy; every eval
answers held-out prompts greedily and logs their `accuracy`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from llmjax import metrics as metrics_lib
from llmjax.data import chat, prompts as prompts_lib
from llmjax.errors import ConfigError
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.parallel import distributed, mesh as mesh_lib
from llmjax.rl import advantages as adv_lib
from llmjax.rl.policy_loss import IMPORTANCE_SAMPLING_LEVELS, LOSS_TYPES, policy_loss
from llmjax.rl.rewards import reference_match
from llmjax.rl.rollouts import GroupAdvantages, Reward, RolloutConfig, RolloutSource
from llmjax.runs.load import has_checkpoint
from llmjax.sample.sampler import Sampler, sample_per_process
from llmjax.stages.context import RunContext, TokenizerConfig
from llmjax.train import loop, roles as roles_lib
from llmjax.train.losses import target_logps
from llmjax.train.optimizer import OptimizerConfig

ADVANTAGES = ("group", "rloo")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Sampling, rewards and loss of the grpo stage (TRL's names and defaults where it has them).

  Attributes:
    num_generations: G, completions per prompt (>= 2: a group needs a spread).
    max_new_tokens: the completion budget (TRL's max_completion_length).
    temperature, top_k, top_p: sampling (top_k 0 and top_p 1.0: no limit).
    rewards: reward names: built-ins (`llmjax.rl.rewards.BUILTIN_REWARDS`) or
      `module.function` paths; `reward_weights` one float each (default 1.0).
    advantage: 'group' (GRPO: reward - group mean, scaled by `scale_rewards`) or 'rloo'
      (reward - mean of the group's other rewards).
    scale_rewards: 'group' (divide by the group's std), 'batch' or 'none' (Dr. GRPO).
    loss_type: 'grpo', 'bnpo', 'dr_grpo' or 'dapo' (TRL's default).
    epsilon, epsilon_high: the clip range [1 - epsilon, 1 + epsilon_high] (DAPO: 0.28 high).
    beta: the k3 KL coefficient (0: no reference model is held or run).
    use_bias_correction_kl: weight the k3 KL by the importance ratio (TRL 1.16's default).
    importance_sampling_level: 'token' or 'sequence' (GSPO).
    num_iterations: mu, passes over each rollout.
    steps_per_generation: minibatches per rollout (TRL's name): the rollout's rows are
      shuffled and split into this many optimizer steps, each pass. A rollout thus feeds
      steps_per_generation x num_iterations steps; when that is > 1 the sampling policy's
      log-probs are kept as old_logps (the ratio's denominator).
    mask_truncated_completions: completions that hit the budget without stopping do not
      count in the loss.
    dynamic_sampling: DAPO's dynamic sampling: groups whose rewards are all equal (no
      learning signal) are replaced by groups of further prompts, up to
      `max_sampling_rounds` sampling rounds per rollout.
    eval_max_new_tokens: the budget of the greedy held-out answers.
  """
  num_generations: int = 8
  max_new_tokens: int = 256
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  rewards: tuple[str, ...] = ("math_answer",)
  reward_weights: tuple[float, ...] | None = None
  advantage: str = "group"
  scale_rewards: str = "group"
  loss_type: str = "dapo"
  epsilon: float = 0.2
  epsilon_high: float | None = None
  beta: float = 0.0
  use_bias_correction_kl: bool = True
  importance_sampling_level: str = "token"
  num_iterations: int = 1
  steps_per_generation: int = 1
  mask_truncated_completions: bool = False
  dynamic_sampling: bool = False
  max_sampling_rounds: int = 4
  eval_max_new_tokens: int | None = None

  def __post_init__(self):
    name = "GRPOConfig"
    object.__setattr__(self, "rewards", (self.rewards,) if isinstance(self.rewards, str)
                       else tuple(self.rewards))
    if self.num_generations < 2 and self.advantage == "rloo" or self.num_generations < 1:
      raise ConfigError(f"{name}.num_generations={self.num_generations}: RLOO needs >= 2")
    if self.num_generations < 2 and self.scale_rewards == "group":
      raise ConfigError(f"{name}.num_generations={self.num_generations}: group-scaled "
                        "advantages need at least 2 completions per prompt (the group's std)")
    for field, allowed in (("advantage", ADVANTAGES), ("scale_rewards", adv_lib.SCALES),
                           ("loss_type", LOSS_TYPES),
                           ("importance_sampling_level", IMPORTANCE_SAMPLING_LEVELS)):
      if getattr(self, field) not in allowed:
        raise ConfigError(f"{name}.{field}={getattr(self, field)!r}: use one of {allowed}")
    if self.epsilon_high is not None and self.epsilon_high < self.epsilon:
      raise ConfigError(f"{name}.epsilon_high={self.epsilon_high} is below epsilon="
                        f"{self.epsilon}: clip-higher raises the upper bound (DAPO: 0.28)")
    if not self.rewards:
      raise ConfigError(f"{name}.rewards is empty: name at least one (e.g. 'math_answer')")
    if self.reward_weights is not None and len(self.reward_weights) != len(self.rewards):
      raise ConfigError(f"{name}.reward_weights has {len(self.reward_weights)} entries for "
                        f"{len(self.rewards)} rewards {list(self.rewards)}")
    if (self.max_new_tokens < 1 or self.num_iterations < 1 or self.beta < 0
        or self.max_sampling_rounds < 1 or self.steps_per_generation < 1):
      raise ConfigError(f"{name} needs max_new_tokens >= 1, num_iterations >= 1, "
                        "steps_per_generation >= 1, beta >= 0 and max_sampling_rounds >= 1")
    for r in self.rewards:
      Reward.resolve(r)  # an unknown name fails now, listing the built-ins

  @property
  def needs_old_logps(self) -> bool:
    """Whether steps train on rollouts sampled by other parameters than theirs."""
    return self.num_iterations * self.steps_per_generation > 1

  def resolved_rewards(self) -> list[Reward]:
    weights = self.reward_weights or (1.0,) * len(self.rewards)
    return [Reward.resolve(r, w) for r, w in zip(self.rewards, weights)]


def grpo_objective(cfg: GRPOConfig, chunk_size: int = 0):
  """The train loop's loss: `policy_loss` as (sum, weight) so microbatches add up exactly.
  `chunk_size` (`TrainConfig.loss_chunk_size`): the completion window's output layer runs
  over that many positions at a time (`llmjax.train.losses.target_logps`).

  grpo: (sum over completions of their token-mean loss, completions); bnpo and dapo:
  (token sum, tokens) over the whole step (dapo's normaliser; bnpo's per-microbatch mean in
  TRL is the same when microbatches hold equal token counts); dr_grpo: (token sum / budget,
  completions).
  """
  def loss_fn(policy, roles, batch):
    mask = batch["loss_mask"].astype(jnp.float32)
    _, logps, entropy = target_logps(policy, batch, cfg.max_new_tokens, chunk_size)
    entropy = jax.lax.stop_gradient(entropy)
    old = batch["old_logps"] if cfg.needs_old_logps else jax.lax.stop_gradient(logps)
    ref = None
    if cfg.beta > 0:
      ref_model = roles_lib.reference_model(policy, roles)
      ref = target_logps(ref_model, batch, cfg.max_new_tokens, chunk_size)[1]
    loss, metrics = policy_loss(logps, old, batch["advantages"], mask,
                                loss_type=cfg.loss_type, epsilon=cfg.epsilon,
                                epsilon_high=cfg.epsilon_high, beta=cfg.beta, ref_logps=ref,
                                importance_sampling_level=cfg.importance_sampling_level,
                                max_completion_length=cfg.max_new_tokens,
                                use_bias_correction_kl=cfg.use_bias_correction_kl,
                                entropies=entropy)
    n = jnp.float32(mask.shape[0])
    tokens = jnp.maximum(mask.sum(), 1.0)
    if cfg.loss_type in ("bnpo", "dapo"):
      loss_sum, weight = loss * tokens, tokens
    else:
      loss_sum, weight = loss * n, n
    # policy_loss's metrics are token means (per-completion means for GSPO's clip ratios):
    # weighted by their counts, they add up over microbatches to the whole step's.
    per_sequence = cfg.importance_sampling_level == "sequence"
    aux = {k: (v * (n if per_sequence and k.startswith("clip_ratio") else tokens),
               n if per_sequence and k.startswith("clip_ratio") else tokens)
           for k, v in metrics.items() if not k.endswith(("_min", "_max"))}
    adv = batch["advantages"]
    aux["advantage_abs"] = (jnp.sum(jnp.abs(adv)), n)
    # How far the sampler's log-probs are from this forward pass's, on the batch's first step
    # (the loss uses this forward pass; a large gap means the sampler computes another model).
    fresh = mask * batch["fresh"][:, None]
    gap = jnp.abs(jax.lax.stop_gradient(logps) - batch["sampler_logps"]) * fresh
    aux["logprob_gap"] = (jnp.sum(gap), jnp.sum(fresh))
    return loss_sum, weight, aux
  return loss_fn


def _old_logps_fn(ctx: RunContext, window: int, chunk_size: int = 0):
  """(graphdef, params, this process's rows) -> their targets' log-probs `[rows, seq]`, by the
  training forward pass (over each row's `window` completion positions, as the loss reads
  them), with the rows split over the run's batch axes as in a step. It runs over the whole
  rollout at once, so `chunk_size` (the loss's) matters even more here: unchunked, 256
  completions x 512 positions of a 152k vocabulary are 80 GB of float32 logits."""
  mesh, rules = mesh_lib.mesh_and_rules(ctx.mesh, ctx.rules)
  rows = mesh_lib.batch_sharding(mesh, rules)
  forward = jax.jit(lambda gd, p, b: target_logps(nnx.merge(gd, p), b, window, chunk_size)[1],
                    static_argnums=0, out_shardings=rows)

  def old_logps(graphdef, params, batch):
    inputs = {k: batch[k] for k in ("tokens", "targets", "positions", "segment_ids",
                                   "loss_mask")}
    with mesh_lib.activation_sharding(mesh, rules):
      out = forward(graphdef, params, mesh_lib.host_batch_to_global(inputs, rows))
    return mesh_lib.global_to_host_rows(out, rows)
  return old_logps


def accuracy(graphdef: nnx.GraphDef, params: Any, tokenizer: Any, template: str,
             items: Sequence[dict[str, Any]], max_new_tokens: int) -> dict[str, float]:
  """Greedy answers to held-out prompts, checked by `reference_match` (`math_answer` for
  numbers): the fraction right (over every process's share of `items`; each process passes
  as many)."""
  if not items:
    return {}
  sampler = Sampler(graphdef, params, tokenizer, eos_ids=chat.stop_token_ids(tokenizer, template))
  out = sample_per_process(sampler, [it["prompt_ids"] for it in items],
                           max_new_tokens=max_new_tokens)
  right = sum(reference_match(out.texts[i][0], it["answer"]) for i, it in enumerate(items))
  right, n = distributed.gather_floats([right, len(items)]).sum(axis=0)
  return {"accuracy": float(right / n), "accuracy_n": int(n)}


@dataclasses.dataclass(frozen=True)
class GRPO:
  name = "grpo"
  model: ModelConfig
  data: prompts_lib.PromptDataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  grpo: GRPOConfig
  chat_template: str = "chatml"
  init_from: str | None = None
  reference_from: str | None = None
  lora: LoraConfig | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    cfg = self.grpo
    start = ctx.start(self.init_from, self.model, f"{self.name}.init_from")
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    template = self.chat_template
    # A first stage trains its tokenizer on the prompts; any other uses its start's.
    questions = ([it["question"] for it in prompts_lib.load_prompts(self.data)[0]]
                 if ctx.tokenizer is None and start is None and not self.tokenizer.path else [])
    tokenizer = ctx.ensure_tokenizer(self.tokenizer, questions, self.model, self.name,
                                     has_start=start is not None)
    stop_ids = chat.stop_token_ids(tokenizer, template)  # ConfigError without the template's
    train_ex, eval_ex, stats = prompts_lib.prompt_data(self.data, tokenizer, template)
    counts = stats.as_dict()
    roles: dict[str, roles_lib.Role] = {}
    if cfg.beta > 0:
      ref = (ctx.resolve(self.reference_from, f"{self.name}.reference_from")
             if self.reference_from else start if self.lora is None else None)
      if ref is not None:
        roles[roles_lib.REFERENCE] = ref.frozen_role()
      elif self.lora is None:
        raise ConfigError("grpo.beta > 0 needs a reference: start from a trained model or "
                          "set grpo.reference_from")

    pid, nproc = jax.process_index(), jax.process_count()
    seq_len = self.data.max_prompt_tokens + cfg.max_new_tokens
    rollout_cfg = RolloutConfig(cfg.num_generations, cfg.max_new_tokens, cfg.temperature,
                                cfg.top_k, cfg.top_p, cfg.num_iterations,
                                cfg.mask_truncated_completions, seq_len, self.train.seed,
                                cfg.dynamic_sampling, cfg.max_sampling_rounds,
                                cfg.steps_per_generation)

    def make_sampler(graphdef, params):
      return Sampler(graphdef, params, tokenizer, eos_ids=stop_ids)

    source = RolloutSource(prompts_lib.PromptIterator(train_ex, self.data, pid, nproc),
                           make_sampler, cfg.resolved_rewards(), rollout_cfg,
                           GroupAdvantages(cfg.num_generations, cfg.advantage,
                                           cfg.scale_rewards, cfg.needs_old_logps,
                                           _old_logps_fn(ctx, cfg.max_new_tokens,
                                                         self.train.loss_chunk_size)))
    held_out = prompts_lib.eval_prompts(eval_ex, self.data, pid, nproc)
    budget = cfg.eval_max_new_tokens or cfg.max_new_tokens

    def extra_eval(graphdef, params, step):
      del step
      return accuracy(graphdef, params, tokenizer, template, held_out, budget)

    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, counts, kind="data")
      if held_out and start is not None and not has_checkpoint(ctx.workdir, self.name):
        # The starting model's held-out accuracy: what the eval records are compared with.
        writer.write(0, extra_eval(*start.float_model(), 0), kind="baseline")
      meta = {"tokenizer": ctx.tokenizer_file(), "chat_template_name": template,
              "chat_template": chat.chat_template_jinja(template), **start_meta}
      return loop.train(stage=self.name, policy=policy, roles=roles,
                        loss_fn=grpo_objective(cfg, self.train.loss_chunk_size),
                        train_data=source, eval_data=[],
                        train_cfg=self.train, opt_cfg=self.optimizer, writer=writer,
                        meta=meta, extra_eval=extra_eval if held_out else None,
                        **ctx.loop_kwargs())
    finally:
      writer.close()


@gin.configurable("grpo")
def grpo_stage(model: ModelConfig = gin.REQUIRED,
               data: prompts_lib.PromptDataConfig = gin.REQUIRED,
               train: loop.TrainConfig = gin.REQUIRED,
               optimizer: OptimizerConfig = OptimizerConfig(),
               tokenizer: TokenizerConfig = TokenizerConfig(),
               grpo: GRPOConfig = GRPOConfig(),
               chat_template: str = "chatml",
               init_from: str | None = None,
               reference_from: str | None = None,
               lora: LoraConfig | None = None) -> GRPO:
  """The GRPO stage as configured in gin (`grpo.data = @PromptDataConfig()`, `grpo.grpo =
  @GRPOConfig()`, ...). `init_from`: where to start (default: the previous stage);
  `reference_from`: the KL reference when `GRPOConfig.beta > 0` (default: the start; with
  LoRA, the base with adapters off)."""
  chat.get_template(chat_template)
  if "math_answer" in grpo.rewards and data.format not in prompts_lib.NUMERIC_FORMATS:
    raise ConfigError(f"grpo: the math_answer reward checks numeric answers, but "
                      f"PromptDataConfig.format={data.format!r} has text answers: use one of "
                      f"{prompts_lib.NUMERIC_FORMATS}, or other rewards")
  rows = data.prompts_per_step * grpo.num_generations
  if rows % (grpo.steps_per_generation * train.grad_accum_steps):
    raise ConfigError(f"grpo: prompts_per_step x num_generations = {rows} rows do not split "
                      f"into GRPOConfig.steps_per_generation={grpo.steps_per_generation} "
                      f"minibatches of TrainConfig.grad_accum_steps={train.grad_accum_steps} "
                      "microbatches each")
  return GRPO(model, data, train, optimizer, tokenizer, grpo, chat_template, init_from,
              reference_from, lora)
