"""Stage `dpo`: preference fine-tuning on chosen/rejected pairs, without a reward model.

Starts from the previous stage (or `init_from`), usually an SFT model, which is also the
frozen reference unless `reference_from` names another; a LoRA policy's reference is its own
base with the adapters off. Pairs are rendered with the chat template and packed whole
(`llmjax.data.preferences`). The loss is one of the DPO family, or several weighted
(`llmjax.preference.losses.dpo_loss`: sigmoid, ipo, robust, hinge, ...), or reference-free
SimPO or ORPO (ORPO adds the chosen completion's per-token NLL, averaged per pair).

With `precompute_reference`, the reference's log-probs are computed in one pass before
training and saved in the workdir (`reference_logps/dpo.npz`): no reference model in memory
during training, and a resumed run reads them back. The precomputed reference is the float
start (for QLoRA: not its quantized copy, which the live reference would be).

Logged as TRL logs them: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies (the implicit reward beta * (logp - ref_logp); beta * average logp for
SimPO/ORPO), logps/chosen, logps/rejected; each eval also answers held-out questions
greedily (exact_match, and rejected_match: how often the answer is the rejected one).
"""

from __future__ import annotations

import dataclasses
import os
import gin
import jax
import jax.numpy as jnp

from llmjax import metrics as metrics_lib
from llmjax.data import chat, preferences
from llmjax.errors import ConfigError
from llmjax.model.config import ModelConfig
from llmjax.model.lora import LoraConfig
from llmjax.parallel import mesh as mesh_lib
from llmjax.preference import losses, reference as reference_lib
from llmjax.preference.logps import PairLogps, pair_logps, reference_from_batch
from llmjax.runs.load import has_checkpoint
from llmjax.stages.context import RunContext, TokenizerConfig
from llmjax.stages.preference_data import answer_items, prepare_pairs
from llmjax.stages.sft import exact_match
from llmjax.train import loop, roles as roles_lib
from llmjax.train.optimizer import OptimizerConfig

REFERENCE_FREE = ("simpo", "orpo")
# These sort the batch's pairs, which empty slots of packed rows would join: not offered here.
# ('sft', the chosen NLL as a token mean over the batch, is: empty slots add no tokens, and
# like TRL's it is a mean per microbatch.)
BATCH_COUPLED = ("aot", "aot_unpaired")
STAGE_LOSS_TYPES = tuple(t for t in losses.LOSS_TYPES if t not in BATCH_COUPLED) + REFERENCE_FREE


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PreferenceLoss:
  """Which preference loss, with its settings (TRL's names and defaults).

  Attributes:
    loss_type: a DPO-family type, a list of them (combined with `loss_weights`), or a
      reference-free 'simpo' / 'orpo' alone. See `llmjax.preference.losses`.
    beta: DPO's beta (IPO's tau); SimPO's beta; ORPO's lambda (TRL's ORPO `beta`).
    label_smoothing: cDPO / robust flip probability, or EXO's epsilon.
    simpo_gamma: SimPO's target reward margin gamma (TRL's `simpo_gamma`).
    use_weighting: WPO (TRL's `use_weighting`): each pair's loss times its weight
      w_chosen * w_rejected, w = exp(mean over the completion of logp - log sum_v p_v^2)
      under the policy (`llmjax.preference.losses.wpo_weights`). DPO-family types only.
  """
  loss_type: str | tuple[str, ...] = "sigmoid"
  loss_weights: tuple[float, ...] | None = None
  beta: float = 0.1
  label_smoothing: float = 0.0
  simpo_gamma: float = 0.5
  use_weighting: bool = False

  def __post_init__(self):
    types = self.types
    unknown = [t for t in types if t not in STAGE_LOSS_TYPES]
    if unknown:
      why = (f" ({[t for t in unknown if t in BATCH_COUPLED]} couple the pairs of a batch, "
             "and empty slots of packed rows would join them)" if set(unknown) & set(BATCH_COUPLED)
             else "")
      raise ConfigError(f"PreferenceLoss.loss_type: {unknown} not available{why}; choose from "
                        f"{list(STAGE_LOSS_TYPES)}")
    if set(types) & set(REFERENCE_FREE) and len(types) > 1:
      raise ConfigError(f"PreferenceLoss.loss_type={list(types)}: {REFERENCE_FREE} are "
                        "reference-free and stand alone; combine only DPO-family types")
    if self.use_weighting and self.reference_free:
      raise ConfigError(f"PreferenceLoss.use_weighting (WPO) weights DPO-family losses; "
                        f"loss_type {self.loss_type!r} has no such weighting (TRL's CPO/ORPO "
                        "trainers neither): drop one of them")
    # The pure losses check beta, label_smoothing and the weights as they trace: trace them
    # now (shapes only, nothing runs), so a bad value fails before any data or compile.
    one = jax.ShapeDtypeStruct((1,), jnp.float32)
    logps = PairLogps(one, one, one, one, jax.ShapeDtypeStruct((1,), jnp.bool_),
                      one if self.use_weighting else None)
    jax.eval_shape(lambda p, r: self.per_pair(p, r), logps, logps)

  @property
  def types(self) -> tuple[str, ...]:
    return (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)

  @property
  def reference_free(self) -> bool:
    return self.types[0] in REFERENCE_FREE

  def per_pair(self, pol: PairLogps, ref: PairLogps | None
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(loss, chosen reward, rejected reward), each `[pairs]`, from flat `PairLogps`."""
    if self.reference_free:
      avg_c = pol.chosen / jnp.maximum(pol.chosen_lengths, 1.0)
      avg_r = pol.rejected / jnp.maximum(pol.rejected_lengths, 1.0)
      rewards = (jax.lax.stop_gradient(self.beta * avg_c),
                 jax.lax.stop_gradient(self.beta * avg_r))
      if self.types[0] == "simpo":
        loss = losses.simpo_loss(avg_c, avg_r, beta=self.beta, gamma=self.simpo_gamma,
                                 label_smoothing=self.label_smoothing)
      else:
        loss = -avg_c + losses.orpo_loss(avg_c, avg_r, lam=self.beta)
      return (loss,) + rewards
    loss = losses.dpo_loss(pol.chosen, pol.rejected, ref.chosen, ref.rejected,
                           loss_type=self.types, beta=self.beta,
                           label_smoothing=self.label_smoothing,
                           chosen_lengths=pol.chosen_lengths,
                           rejected_lengths=pol.rejected_lengths,
                           loss_weights=self.loss_weights, pair_weights=pol.weights)
    return (loss,) + losses.dpo_rewards(pol.chosen, pol.rejected, ref.chosen, ref.rejected,
                                        self.beta)


def preference_objective(loss: PreferenceLoss, max_pairs: int, precomputed: bool,
                         chunk_size: int = 0):
  """The train loop's loss function: the mean preference loss over the batch's pairs, with
  TRL's reward and log-prob metrics as (sum, count) pairs. `chunk_size`
  (`TrainConfig.loss_chunk_size`): the policy's and the reference's output layers run over
  that many positions at a time (`llmjax.train.losses.token_stats`)."""
  def loss_fn(policy, roles, batch):
    pol = pair_logps(policy, batch, max_pairs, chunk_size, wpo_weights=loss.use_weighting)
    pol = pol.flat()
    ref = None
    if not loss.reference_free:
      ref = (reference_from_batch(batch, max_pairs) if precomputed else
             pair_logps(roles_lib.reference_model(policy, roles), batch, max_pairs,
                        chunk_size)).flat()
    per_pair, r_c, r_r = loss.per_pair(pol, ref)
    valid = pol.valid
    n = jnp.sum(valid.astype(jnp.float32))
    total = lambda x: jnp.sum(jnp.where(valid, x, 0.0))
    aux = {"rewards/chosen": (total(r_c), n), "rewards/rejected": (total(r_r), n),
           "rewards/margins": (total(r_c - r_r), n),
           "rewards/accuracies": (total((r_c > r_r).astype(jnp.float32)), n),
           "logps/chosen": (total(jax.lax.stop_gradient(pol.chosen)), n),
           "logps/rejected": (total(jax.lax.stop_gradient(pol.rejected)), n)}
    return total(per_pair), n, aux
  return loss_fn


@dataclasses.dataclass(frozen=True)
class DPO:
  name = "dpo"
  model: ModelConfig
  data: preferences.PreferenceDataConfig
  train: loop.TrainConfig
  optimizer: OptimizerConfig
  tokenizer: TokenizerConfig
  loss: PreferenceLoss
  chat_template: str = "chatml"
  init_from: str | None = None
  reference_from: str | None = None
  precompute_reference: bool = False
  eval_questions: int = 200
  eval_max_new_tokens: int = 16
  lora: LoraConfig | None = None

  def run(self, ctx: RunContext) -> loop.TrainResult:
    chat.get_template(self.chat_template)
    start = ctx.start(self.init_from, self.model, f"{self.name}.init_from")
    if start is None and not self.loss.reference_free:
      raise ConfigError(f"{self.name} needs a model to start from (and to compare with): run "
                        f"it after an sft stage, or set {self.name}.init_from")
    policy, start_meta = ctx.policy(self.name, self.model, self.init_from, self.lora,
                                    self.train.seed)
    pairs = prepare_pairs(ctx, self.name, self.data, self.tokenizer, self.model,
                          self.chat_template, has_start=start is not None)
    train_ex, eval_ex = pairs.train, pairs.eval
    roles: dict[str, roles_lib.Role] = {}
    ref = None
    if not self.loss.reference_free:
      if self.reference_from:
        ref = ctx.resolve(self.reference_from, f"{self.name}.reference_from")
      elif self.lora is None:
        ref = start  # with LoRA, the policy's own base (adapters off) is the reference
    if self.precompute_reference and not self.loss.reference_free:
      train_ex, eval_ex = self._precomputed(ctx, ref or start, train_ex, eval_ex)
    elif ref is not None:
      roles[roles_lib.REFERENCE] = ref.frozen_role()

    pid, nproc = jax.process_index(), jax.process_count()
    train_ds = preferences.train_batches(train_ex, self.data, pid, nproc)
    eval_data = preferences.eval_batches(eval_ex, self.data, pid, nproc)
    items = answer_items(pairs.eval_pairs, self.eval_questions)
    tokenizer, template = pairs.tokenizer, self.chat_template

    def extra_eval(graphdef, params, step):
      del step
      return exact_match(graphdef, params, tokenizer, template, items,
                         self.eval_max_new_tokens)

    writer = metrics_lib.MetricsWriter(ctx.workdir, self.name, self.train.total_steps,
                                       enabled=ctx.is_chief)
    try:
      writer.write(0, pairs.counts, kind="data")
      if items and start is not None and not has_checkpoint(ctx.workdir, self.name):
        # What the starting model answers: the eval records say what preference moved.
        writer.write(0, extra_eval(*start.float_model(), 0), kind="baseline")
      meta = {"tokenizer": ctx.tokenizer_file(), "chat_template_name": template,
              "chat_template": chat.chat_template_jinja(template), **start_meta}
      loss_fn = preference_objective(self.loss, self.data.max_pairs_per_row,
                                     precomputed=self.precompute_reference,
                                     chunk_size=self.train.loss_chunk_size)
      return loop.train(stage=self.name, policy=policy, roles=roles, loss_fn=loss_fn,
                        train_data=train_ds, eval_data=eval_data, train_cfg=self.train,
                        opt_cfg=self.optimizer, writer=writer, meta=meta,
                        extra_eval=extra_eval if items else None, **ctx.loop_kwargs())
    finally:
      writer.close()

  def _precomputed(self, ctx: RunContext, ref, train_ex, eval_ex):
    """The examples with the reference's log-probs attached, computed once per run."""
    graphdef, params = ref.float_model()
    path = os.path.join(ctx.workdir, "reference_logps", f"{self.name}.npz")
    mesh, rules = mesh_lib.mesh_and_rules(ctx.mesh, ctx.rules)

    def compute(examples):
      return reference_lib.compute_table(graphdef, params, examples, self.data, mesh, rules,
                                         self.train.loss_chunk_size)
    tables = reference_lib.load_or_compute(path, {"train": train_ex, "eval": eval_ex},
                                           ref.source, compute)
    return (preferences.attach_reference_logps(train_ex, tables["train"]),
            preferences.attach_reference_logps(eval_ex, tables["eval"]))


@gin.configurable("dpo")
def dpo_stage(model: ModelConfig = gin.REQUIRED,
              data: preferences.PreferenceDataConfig = gin.REQUIRED,
              train: loop.TrainConfig = gin.REQUIRED,
              optimizer: OptimizerConfig = OptimizerConfig(),
              tokenizer: TokenizerConfig = TokenizerConfig(),
              loss: PreferenceLoss = PreferenceLoss(),
              chat_template: str = "chatml",
              init_from: str | None = None,
              reference_from: str | None = None,
              precompute_reference: bool = False,
              eval_questions: int = 200,
              eval_max_new_tokens: int = 16,
              lora: LoraConfig | None = None) -> DPO:
  """The DPO stage as configured in gin (`dpo.data = @PreferenceDataConfig()`, ...).

  `init_from`: where to start (default: the previous stage). `reference_from`: the frozen
  reference (default: the start; with `lora`, the base with adapters off). `loss`:
  `@PreferenceLoss()`. `precompute_reference`: one reference pass before training, saved
  with the run, instead of a reference model held during training.
  """
  chat.get_template(chat_template)
  if reference_from and loss.reference_free:
    raise ConfigError(f"dpo.reference_from is set but loss_type {loss.loss_type!r} uses no "
                      "reference: drop one of them")
  return DPO(model, data, train, optimizer, tokenizer, loss, chat_template, init_from,
             reference_from, precompute_reference, eval_questions, eval_max_new_tokens, lora)
