"""Rollouts for RL stages: prompts -> G completions each from the current policy -> scores
-> advantages -> training batches.

`RolloutSource` is a `loop.BatchSource`: before every optimizer step the loop hands it the
policy's current parameters (`PolicyView`). A rollout samples completions from them, shuffles
its rows and splits them into `minibatches` slices; the optimizer steps take the slices in
turn, `num_iterations` times over (TRL's steps_per_generation and num_iterations), so a
rollout feeds `minibatches x num_iterations` steps. After the first, the parameters are no
longer those that sampled, so the sampling policy's log-probs are kept as `old_logps`. Its
state (the prompt iterator's position, the rollout counter and the rollout still in use) is
saved with every checkpoint, so a resumed run samples exactly what the straight run sampled.

With several processes each one brings its own prompts and scores its own completions, and
the sampling itself is one program over all processes' devices
(`sampler.sample_per_process`); rollout metrics are averaged over processes.

What a rollout's rows are trained with comes from its `finish` step: `GroupAdvantages`
(GRPO/RLOO: the reward functions' totals turned into one advantage per completion) or the PPO
stage's reward-model scoring, values and GAE (`llmjax.stages.ppo`).

Batch layout (numpy, `[rows, seq]` unless noted; rows = prompts x G, prompt-major before the
minibatch shuffle): `tokens`, `targets`, `positions`, `segment_ids` (1 on the sequence, 0 on
padding), `loss_mask` (1 where the target is a completion token), `stopped` `[rows]` (the
completion ended with a stop token), `sampler_logps` (the sampler's own log-probs of the
targets), `fresh` `[rows]` (1 on the step that sampled the batch, when the parameters are
still the sampler's), and what `finish` adds: for GRPO `advantages` `[rows]` and `old_logps`
(the sampling policy's log-probs by the training forward pass; zeros while every step is
on-policy).
"""

from __future__ import annotations

import base64
import functools
import dataclasses
import inspect
import io
import json
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx

from llmjax.errors import ConfigError, LlmjaxError
from llmjax.parallel import distributed
from llmjax.rl import advantages as adv_lib
from llmjax.rl import rewards as rewards_lib
from llmjax.sample.sampler import sample_per_process
from llmjax.train import loop

BATCH_KEYS = ("tokens", "targets", "positions", "segment_ids", "loss_mask", "advantages",
              "old_logps", "sampler_logps", "fresh")


class RewardError(LlmjaxError):
  """A reward function raised: the run stops naming it and the prompt (never a silent 0)."""


@dataclasses.dataclass(frozen=True)
class Reward:
  """A named reward function with its weight in the total reward.

  The function receives, by keyword, whichever of these it declares: `completion` (text),
  `reference` (the answer), `prompt` (the question text), `num_tokens` (completion length)
  and `max_tokens` (the generation budget); it returns a float.
  """
  name: str
  fn: Callable[..., float]
  weight: float = 1.0
  # The keywords `fn` takes (None: any, it has **kwargs), read once: a rollout calls each
  # reward once per completion, and `inspect.signature` costs tens of microseconds.
  accepted: frozenset[str] | None = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    params = inspect.signature(self.fn).parameters
    object.__setattr__(self, "accepted",
                       None if any(p.kind == p.VAR_KEYWORD for p in params.values())
                       else frozenset(params))

  @classmethod
  def resolve(cls, name: str, weight: float = 1.0) -> "Reward":
    return cls(name, rewards_lib.resolve_reward(name), weight)

  @property
  def label(self) -> str:
    """The name in metrics: a `module.function` path's function name."""
    return self.name.rsplit(".", 1)[-1]

  def __call__(self, **available: Any) -> float:
    kwargs = available if self.accepted is None else {k: v for k, v in available.items()
                                                      if k in self.accepted}
    try:
      return float(self.fn(**kwargs))
    except Exception as e:  # noqa: BLE001 -- any failure of user code stops the run, named
      prompt = str(available.get("prompt", ""))[:120]
      raise RewardError(f"reward {self.name!r} raised {type(e).__name__}: {e} (prompt: "
                        f"{prompt!r}); fix the function or drop it from the rewards") from e


def score(rewards: Sequence[Reward], texts: list[list[str]], lengths: np.ndarray,
          items: Sequence[dict[str, Any]], max_tokens: int) -> dict[str, np.ndarray]:
  """Each reward's values `[prompts, G]` for every completion, and their weighted `total`."""
  out = {}
  for r in rewards:
    out[r.label] = np.asarray(
        [[r(completion=texts[i][j], reference=it["answer"], prompt=it.get("question", ""),
            num_tokens=int(lengths[i, j]), max_tokens=max_tokens)
          for j in range(len(texts[i]))] for i, it in enumerate(items)], np.float32)
  out["total"] = sum((r.weight * out[r.label] for r in rewards),
                     np.zeros(lengths.shape, np.float32))
  return out


def training_rows(prompts: Sequence[Sequence[int]], completions: np.ndarray,
                  lengths: np.ndarray, seq_len: int,
                  logprobs: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """Prompt + completion rows `[n * G, seq_len]` in the batch layout (without advantages).

  Args:
    prompts: n token id lists.
    completions: `[n, G, max_new]` generated ids; `lengths` `[n, G]` how many count.
    logprobs: `[n, G, max_new]` the sampler's log-probs of them, placed at their targets as
      `sampler_logps` (to measure how far the sampler is from the training forward pass).
  """
  n, g = lengths.shape
  rows = n * g
  tokens = np.zeros((rows, seq_len), np.int32)
  targets = np.zeros((rows, seq_len), np.int32)
  loss_mask = np.zeros((rows, seq_len), np.int32)
  segment_ids = np.zeros((rows, seq_len), np.int32)
  positions = np.zeros((rows, seq_len), np.int32)
  sampler_logps = np.zeros((rows, seq_len), np.float32)
  for i in range(n):
    p = list(prompts[i])
    for j in range(g):
      r = i * g + j
      ids = p + completions[i, j, :lengths[i, j]].tolist()
      if len(ids) > seq_len + 1:
        raise ConfigError(f"a prompt of {len(p)} tokens and a completion of {lengths[i, j]} "
                          f"do not fit the {seq_len}-token rows")
      length = len(ids) - 1
      tokens[r, :length] = ids[:-1]
      targets[r, :length] = ids[1:]
      loss_mask[r, len(p) - 1:length] = 1  # targets that are completion tokens
      if logprobs is not None:
        sampler_logps[r, len(p) - 1:length] = logprobs[i, j, :lengths[i, j]]
      segment_ids[r, :length] = 1
      positions[r, :length] = np.arange(length)
  return {"tokens": tokens, "targets": targets, "loss_mask": loss_mask,
          "segment_ids": segment_ids, "positions": positions, "sampler_logps": sampler_logps}




@dataclasses.dataclass(frozen=True)
class RolloutConfig:
  """How completions are sampled and how a rollout feeds steps (see `stages.grpo.GRPOConfig`)."""
  num_generations: int
  max_new_tokens: int
  temperature: float
  top_k: int
  top_p: float
  num_iterations: int
  mask_truncated_completions: bool
  seq_len: int
  seed: int
  dynamic_sampling: bool = False
  max_sampling_rounds: int = 4
  minibatches: int = 1

  @property
  def steps_per_rollout(self) -> int:
    return self.minibatches * self.num_iterations

  @property
  def needs_old_logps(self) -> bool:
    """Whether some step trains on the rollout with parameters other than the sampler's."""
    return self.steps_per_rollout > 1


# Jitted: one dispatch per rollout for what would be a dozen small eager ops.
_group_advantages = jax.jit(adv_lib.group_advantages, static_argnums=1, static_argnames="scale")
_leave_one_out_advantages = jax.jit(adv_lib.leave_one_out_advantages, static_argnums=1)
_zero_spread_groups = jax.jit(adv_lib.zero_spread_groups, static_argnums=1)


class Finish:
  """What a rollout's rows are trained with: adds arrays to the batch, returns metrics.

  Called once per rollout with the sampling parameters (`view`), the scored groups and the
  batch in its layout (see the module doc). State that evolves over the run (e.g. an adaptive
  KL coefficient) goes in `get_state`/`set_state` (a JSON-able dict), saved with checkpoints.
  """

  def __call__(self, view: loop.PolicyView, groups: "Groups",
               batch: dict[str, np.ndarray]) -> dict[str, float]:
    raise NotImplementedError

  def get_state(self) -> dict[str, float]:
    return {}

  def set_state(self, state: dict[str, float]) -> None:
    del state


class GroupAdvantages(Finish):
  """GRPO's (or RLOO's) advantages from the reward functions' totals, one per completion, and
  the sampling policy's log-probs when some step trains off-policy.

  Args:
    advantage: 'group' (reward - group mean, scaled by `scale_rewards`) or 'rloo'.
    old_logps_fn: (graphdef, params, batch) -> `[rows, seq]` log-probs of the targets under
      the sampling parameters, by the training forward pass (this process's rows); needed
      when `needs_old_logps`.
  """

  def __init__(self, num_generations: int, advantage: str = "group",
               scale_rewards: str = "group", needs_old_logps: bool = False,
               old_logps_fn: Callable[[nnx.GraphDef, Any, dict], np.ndarray] | None = None):
    if needs_old_logps and old_logps_fn is None:
      raise ConfigError("training several steps on one rollout needs old_logps_fn")
    self.g, self.advantage, self.scale = num_generations, advantage, scale_rewards
    self.needs_old_logps, self.old_logps_fn = needs_old_logps, old_logps_fn

  def __call__(self, view, groups, batch):
    total = groups.scores["total"].reshape(-1)
    if self.advantage == "rloo":
      advantages = _leave_one_out_advantages(total, self.g)
    else:
      advantages = _group_advantages(total, self.g, scale=self.scale)
    batch["advantages"] = np.asarray(advantages, np.float32)
    batch["old_logps"] = np.zeros(batch["tokens"].shape, np.float32)
    if self.needs_old_logps:
      batch["old_logps"] = np.asarray(self.old_logps_fn(view.graphdef, view.params, batch),
                                      np.float32)
    return {}


class RolloutSource(loop.BatchSource):
  """Training batches sampled from the live policy (see the module doc)."""

  def __init__(self, prompts: Any, make_sampler: Callable[[nnx.GraphDef, Any], Any],
               rewards: Sequence[Reward], cfg: RolloutConfig, finish: Finish):
    """
    Args:
      prompts: an iterator of prompt groups with get_state()/set_state() (bytes): each
        `next()` gives this process's examples `{prompt_ids, answer, question}`.
      make_sampler: (graphdef, params) -> a `Sampler` over those parameters.
      rewards: reward functions scoring each completion on the host (none for PPO, whose
        reward model scores on device in `finish`).
      finish: adds what the rows are trained with (`GroupAdvantages`, or PPO's).
    """
    self.prompts, self.make_sampler, self.rewards, self.cfg = prompts, make_sampler, rewards, cfg
    self.finish = finish
    self._sampler = None  # one Sampler, given the current parameters at every rollout
    self.rollouts = 0  # how many rollouts have been sampled
    self.batch: dict[str, np.ndarray] | None = None  # the rollout in use, rows shuffled
    self.uses = 0  # optimizer steps taken on it
    self._pending: dict[str, list[float]] = {}
    # Rollouts whose metrics are not computed yet: `metrics()` does it, called by the loop
    # after the step is queued, so the host's bookkeeping is off the rollout -> step path.
    self._unrecorded: list[tuple] = []

  # ---- BatchSource ----

  def next_batch(self, view: loop.PolicyView) -> dict[str, np.ndarray]:
    cfg = self.cfg
    if self.batch is None or self.uses >= cfg.steps_per_rollout:
      self.batch = self._rollout(view)
      self.uses = 0
    rows = len(self.batch["tokens"]) // cfg.minibatches
    part = slice(self.uses % cfg.minibatches * rows, (self.uses % cfg.minibatches + 1) * rows)
    self.uses += 1
    # `fresh`: the parameters are still those that sampled the batch (its first step).
    fresh = np.full(rows, float(self.uses == 1), np.float32)
    return {**{k: v[part] for k, v in self.batch.items()}, "fresh": fresh}

  def metrics(self) -> dict[str, float]:
    """Means of the rollout metrics since the last call (what the loop logs with a step)."""
    for rollout in self._unrecorded:
      self._record(*rollout)
    self._unrecorded = []
    names = sorted(k for k, v in self._pending.items() if v)
    means = [float(np.mean(self._pending[k])) for k in names]
    self._pending = {}
    # Every process logs the same steps with the same names: a collective is safe here.
    everyone = distributed.gather_floats(means)  # [processes, metrics]
    return {k: float(everyone[:, i].max() if k.endswith("_max") else everyone[:, i].mean())
            for i, k in enumerate(names)}

  def get_state(self) -> bytes:
    buf = io.BytesIO()
    arrays = {f"batch/{k}": v for k, v in (self.batch or {}).items()}
    finish = np.frombuffer(json.dumps(self.finish.get_state()).encode(), np.uint8)
    np.savez(buf, prompts=np.frombuffer(self.prompts.get_state(), np.uint8),
             counters=np.asarray([self.rollouts, self.uses], np.int64), finish=finish, **arrays)
    # Text: grain's checkpoint handler stores a source's state as a UTF-8 string.
    return base64.b64encode(buf.getvalue())

  def set_state(self, state: bytes) -> None:
    with np.load(io.BytesIO(base64.b64decode(state))) as saved:
      self.prompts.set_state(saved["prompts"].tobytes())
      self.rollouts, self.uses = (int(x) for x in saved["counters"])
      self.finish.set_state(json.loads(saved["finish"].tobytes()))
      batch = {k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith("batch/")}
    self.batch = batch or None

  # ---- One rollout ----

  def _sample(self, sampler, items, params) -> "Groups":
    """G completions of each prompt of `items`, scored: one sampling round."""
    cfg = self.cfg
    # A fresh key per round, from the seed and the round count: resumable, never reused.
    seed = int(np.random.default_rng([cfg.seed, self.rollouts]).integers(2**31))
    self.rollouts += 1
    out = sample_per_process(sampler, [it["prompt_ids"] for it in items],
                             max_new_tokens=cfg.max_new_tokens, num_samples=cfg.num_generations,
                             temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                             seed=seed, params=params)
    scores = score(self.rewards, out.texts, out.lengths, items, cfg.max_new_tokens)
    return Groups(list(items), out.tokens, out.logprobs, out.lengths, out.stopped, scores)

  def _rollout(self, view: loop.PolicyView) -> dict[str, np.ndarray]:
    cfg = self.cfg
    start = time.time()
    if self._sampler is None or self._sampler.graphdef is not view.graphdef:
      self._sampler = self.make_sampler(view.graphdef, view.params)
    sample = functools.partial(self._sample, self._sampler, params=view.params)
    first = groups = sample(next(self.prompts))
    rounds, wanted = 1, len(first.items)
    # Now, while the device is idle: a jitted call in `metrics()` would wait for the step.
    first_spread = first.spread() if self.rewards or cfg.dynamic_sampling else None
    if cfg.dynamic_sampling:
      # DAPO's dynamic sampling: groups whose rewards are all equal teach nothing; sample more
      # prompts until the batch is full of groups with a spread (or the rounds run out, then
      # top up with the others so the batch keeps its shape). Sampling is collective: every
      # process samples another round while any still needs one.
      kept, spare = first.split(first_spread)
      while (rounds < cfg.max_sampling_rounds
             and distributed.any_process(len(kept.items) < wanted)):
        more = sample(next(self.prompts))
        rounds += 1
        good, bad = more.split(more.spread())
        kept, spare = kept.concat(good), spare.concat(bad)
      groups = kept.concat(spare).take(wanted)
    sample_seconds = time.time() - start
    batch = training_rows([it["prompt_ids"] for it in groups.items], groups.tokens,
                          groups.lengths, cfg.seq_len, groups.logprobs)
    batch["stopped"] = groups.stopped.reshape(-1).astype(np.float32)
    if cfg.mask_truncated_completions:
      batch["loss_mask"] = batch["loss_mask"] * batch["stopped"][:, None].astype(np.int32)
    finish_start = time.time()
    extra = self.finish(view, groups, batch)
    self._unrecorded.append((groups, first_spread, rounds, sample_seconds,
                             {**extra, "rollout_score_seconds": time.time() - finish_start}))
    if cfg.minibatches > 1:
      # Minibatches mix the groups (TRL shuffles too): advantages are already computed over
      # whole groups, and each slice sees a spread of prompts.
      order = np.random.default_rng([cfg.seed, self.rollouts, 1]).permutation(
          len(batch["tokens"]))
      batch = {k: v[order] for k, v in batch.items()}
    return batch

  def _record(self, groups: "Groups", first_spread: np.ndarray | None, rounds: int,
              sample_seconds: float, extra: dict[str, float]) -> None:
    total = groups.scores["total"].reshape(-1)
    lengths = groups.lengths.reshape(-1)
    m = {"sampling_rounds": float(rounds),
         "completion_length": float(lengths.mean()),
         "completion_length_max": float(lengths.max()),
         "truncated_fraction": float(1.0 - groups.stopped.mean()),
         "rollout_seconds": sample_seconds,
         "rollout_tokens_per_sec": float(lengths.sum() / max(sample_seconds, 1e-9)), **extra}
    if self.rewards:
      m.update({"reward": float(total.mean()), "reward_std": float(total.std()),
                # Of the first round: what the prompts give before dynamic sampling.
                "frac_zero_spread_groups": float(1.0 - first_spread.mean())})
    for r in self.rewards:
      m[f"rewards/{r.label}/mean"] = float(groups.scores[r.label].mean())
      m[f"rewards/{r.label}/std"] = float(groups.scores[r.label].std())
    for k, v in m.items():
      self._pending.setdefault(k, []).append(v)


@dataclasses.dataclass
class Groups:
  """Prompts with their G scored completions each (arrays `[prompts, G, ...]`)."""
  items: list[dict[str, Any]]
  tokens: np.ndarray
  logprobs: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  scores: dict[str, np.ndarray]

  def spread(self) -> np.ndarray:
    """`[prompts]` bool: the group's total rewards are not all equal."""
    total = self.scores["total"]
    return ~np.asarray(_zero_spread_groups(total.reshape(-1), total.shape[1]))

  def _select(self, idx: np.ndarray) -> "Groups":
    return Groups([self.items[i] for i in idx], self.tokens[idx], self.logprobs[idx],
                   self.lengths[idx], self.stopped[idx],
                   {k: v[idx] for k, v in self.scores.items()})

  def split(self, mask: np.ndarray) -> tuple["Groups", "Groups"]:
    return self._select(np.flatnonzero(mask)), self._select(np.flatnonzero(~mask))

  def take(self, n: int) -> "Groups":
    return self._select(np.arange(n))

  def concat(self, other: "Groups") -> "Groups":
    cat = lambda a, b: np.concatenate([a, b])
    return Groups(self.items + other.items, cat(self.tokens, other.tokens),
                   cat(self.logprobs, other.logprobs), cat(self.lengths, other.lengths),
                   cat(self.stopped, other.stopped),
                   {k: cat(v, other.scores[k]) for k, v in self.scores.items()})
