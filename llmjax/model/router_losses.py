"""The router's statistics, its auxiliary losses, and how they reach the training loss.

Each MoE layer (llmjax/model/moe.py) returns `RouterStats`: sums over its tokens, so layers,
forward passes and devices add up exactly. The transformer sums them over its layers and
`record`s the total of each forward pass; the train loop's `_call_loss` opens `recording()`
around every loss function and turns what was recorded into `router_penalty` (added to the
training loss) and `router_metrics` (logged). Nothing is recorded outside `recording()` (the
sampler, evaluation helpers) or under `not_recorded()` (frozen roles and a LoRA policy's
adapters-off reference: they do not train).

Two losses, both over the token-slots of every MoE layer of one forward pass taken together,
as transformers' `load_balancing_loss_func` concatenates the layers' router logits:

  load balancing (Switch Transformer, Fedus et al. 2021, eq. 4-6, extended to top-k as
  transformers does): `E * sum_e f_e * P_e`, `f_e` = top-k assignments to expert e per
  token (sums to k over the experts), `P_e` = the mean router probability of e. Perfectly
  balanced routing gives k (1 for Switch's top-1); its gradient reaches the router through
  P_e only (the top-k choice is discrete).

  z-loss (ST-MoE, Zoph et al. 2022, eq. 5): the mean over tokens of logsumexp(logits)^2,
  which keeps router logits small and the softmax numerically stable.

Padding tokens (segment id 0) are left out of both, as transformers leaves out positions
its attention mask zeroes.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp


class RouterStats(NamedTuple):
  """Sums over the valid (non-padding) tokens of one or more MoE layers, float32.

  Attributes:
    assignments: `[n_experts]` top-k choices of each expert (before any capacity drop).
    probs: `[n_experts]` router probabilities of each expert, summed over tokens.
    z: `[]` sum of logsumexp(router logits)^2.
    tokens: `[]` token count (one per token per layer: each layer routes every token).
    dropped: `[]` assignments dropped by expert capacity (0 when dropless).
    busiest: `[]` the busiest expert's assignments in each layer, summed over layers.
  """
  assignments: jax.Array
  probs: jax.Array
  z: jax.Array
  tokens: jax.Array
  dropped: jax.Array
  busiest: jax.Array


def router_stats(logits: jax.Array, experts: jax.Array, valid: jax.Array,
                 dropped: jax.Array | None = None) -> RouterStats:
  """The statistics of one layer's routing.

  Args:
    logits: `[tokens, n_experts]` router logits (computed in float32).
    experts: `[tokens, k]` the chosen experts.
    valid: `[tokens]` bool, False for padding.
    dropped: `[]` the count of dropped assignments, if any.
  """
  n_experts = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  w = valid.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  chosen = jnp.sum(jax.nn.one_hot(experts, n_experts, dtype=jnp.float32), axis=1)  # [T, E]
  lse = jax.nn.logsumexp(logits, axis=-1)
  assignments = w @ chosen
  return RouterStats(assignments=assignments, probs=w @ probs, z=jnp.sum(w * lse * lse),
                     tokens=jnp.sum(w),
                     dropped=jnp.zeros((), jnp.float32) if dropped is None
                     else dropped.astype(jnp.float32),
                     busiest=jnp.max(assignments))


def add_stats(a: RouterStats | None, b: RouterStats | None) -> RouterStats | None:
  if a is None or b is None:
    return b if a is None else a
  return jax.tree.map(jnp.add, a, b)


def load_balancing_loss(stats: RouterStats) -> jax.Array:
  """`n_experts * sum_e f_e * P_e` (Switch Transformer; transformers' top-k normalisation:
  `f_e` counts assignments per token, so balanced top-k routing gives k). 0 without tokens."""
  tokens = jnp.maximum(stats.tokens, 1.0)
  n_experts = stats.assignments.shape[-1]
  return n_experts * jnp.sum((stats.assignments / tokens) * (stats.probs / tokens))


def z_loss(stats: RouterStats) -> jax.Array:
  """The mean over tokens of logsumexp(router logits)^2 (ST-MoE). 0 without tokens."""
  return stats.z / jnp.maximum(stats.tokens, 1.0)


# ---- Recording: from the model's forward passes to the train loop --------------------------


class _Recorded(NamedTuple):
  stats: RouterStats
  aux_coef: float
  z_coef: float
  top_k: int


_local = threading.local()


@contextlib.contextmanager
def recording():
  """Collects the router statistics of every forward pass inside (while tracing a loss);
  yields the list they are appended to."""
  previous = getattr(_local, "records", None), getattr(_local, "muted", False)
  _local.records, _local.muted = [], False
  try:
    yield _local.records
  finally:
    _local.records, _local.muted = previous


@contextlib.contextmanager
def not_recorded():
  """Forward passes inside add nothing (a frozen model's routing is not trained)."""
  previous = getattr(_local, "muted", False)
  _local.muted = True
  try:
    yield
  finally:
    _local.muted = previous


def record(stats: RouterStats, aux_coef: float, z_coef: float, top_k: int) -> None:
  """Called by the transformer with one forward pass's statistics (summed over layers).

  Must be called where the loss function runs (not inside a `lax.scan` or `jax.checkpoint`
  body: their tracers cannot leave them), which is why the layers thread their statistics
  out of such transforms explicitly.
  """
  records = getattr(_local, "records", None)
  if records is not None and not getattr(_local, "muted", False):
    records.append(_Recorded(stats, aux_coef, z_coef, top_k))


def router_penalty(records: list) -> jax.Array:
  """The coefficient-weighted router losses of the recorded forward passes, summed: what
  the train loop adds to the mean training loss."""
  total = jnp.zeros((), jnp.float32)
  for r in records:
    if r.aux_coef:
      total = total + r.aux_coef * load_balancing_loss(r.stats)
    if r.z_coef:
      total = total + r.z_coef * z_loss(r.stats)
  return total


# Per-expert load is logged one metric per expert up to this many experts; beyond, only
# the max/mean ratio (a table of 60 curves is noise).
PER_EXPERT_METRICS_UP_TO = 16


def router_metrics(records: list) -> dict[str, tuple[jax.Array, jax.Array]]:
  """(sum, count) pairs of the recorded forward passes (the loop logs sum / count):

    moe/load_balancing_loss, moe/z_loss: the losses (uncoefficiented), per forward pass.
    moe/max_load: each layer's busiest expert's share of its assignments over the mean share
      (1 is perfect balance, n_experts is everything on one expert), averaged over layers.
    moe/dropped_fraction: dropped assignments over all assignments.
    moe/load_e{i}: expert i's share of the assignments (n_experts <= 16), expert i of every
      layer pooled, as the load-balancing loss pools them.
  """
  out: dict[str, list] = {}

  def add(name, s, c):
    acc = out.setdefault(name, [jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)])
    acc[0], acc[1] = acc[0] + s, acc[1] + c
  for r in records:
    st = r.stats
    slots = st.tokens * r.top_k
    n_experts = st.assignments.shape[-1]
    add("moe/load_balancing_loss", load_balancing_loss(st), 1.0)
    add("moe/z_loss", z_loss(st), 1.0)
    add("moe/max_load", n_experts * st.busiest / jnp.maximum(slots, 1.0), 1.0)
    add("moe/dropped_fraction", st.dropped, slots)
    if n_experts <= PER_EXPERT_METRICS_UP_TO:
      for i in range(n_experts):
        add(f"moe/load_e{i}", st.assignments[i], slots)
  return {name: (s, c) for name, (s, c) in out.items()}
