"""Pure loss functions. Each returns sums, not means, so microbatches and hosts add up exactly."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llmjax.errors import ConfigError
from llmjax.model import lora


def target_weights(batch: dict[str, jax.Array]) -> jax.Array:
  """`[batch, seq]` float32: 1 where a target is trained on (inside a document, loss-masked)."""
  return (batch["loss_mask"] * (batch["segment_ids"] != 0)).astype(jnp.float32)


def token_cross_entropy(logits: jax.Array, targets: jax.Array,
                        weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted next-token cross-entropy.

  Args:
    logits: `[batch, seq, vocab]`, any float dtype (computed in float32).
    targets: `[batch, seq]` int token ids.
    weights: `[batch, seq]` float, 0 where a position does not count.
  Returns:
    (sum of weighted token losses, sum of weights), both float32 scalars.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)


def vocab_parallel_cross_entropy(logits: jax.Array, targets: jax.Array,
                                 weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`token_cross_entropy` over logits whose vocab dimension is split on the `tensor` axis.

  Written per device with `shard_map`: each device reduces its own slice of the vocab and
  only `[batch, seq]` statistics cross devices (max, sum of exponentials, the target's
  logit), so the `[batch, seq, vocab]` logits are never gathered. Falls back to the plain
  loss outside a mesh or when the vocab is not split.
  """
  from jax.sharding import PartitionSpec as P
  from llmjax.parallel import mesh as mesh_lib

  active = mesh_lib.active_mesh()
  if active is None:
    return token_cross_entropy(logits, targets, weights)
  mesh, rules = active
  logits_spec = mesh_lib.logical_to_spec(("batch", None, "vocab"), logits.shape, mesh, rules)
  if logits_spec[2] != "tensor":
    return token_cross_entropy(logits, targets, weights)
  row_spec = P(logits_spec[0], None)
  # Sum over the mesh axes that split the rows, and only those: rows that do not divide
  # over data x fsdp (a small microbatch) are replicated there, and a psum over a replicated
  # axis would count every row once per replica.
  rows = logits_spec[0]
  batch_axes = () if rows is None else (rows,) if isinstance(rows, str) else tuple(rows)

  def per_device(lg, t, w):
    lg = lg.astype(jnp.float32)
    local_vocab = lg.shape[-1]
    local_t = t - jax.lax.axis_index("tensor") * local_vocab
    here = (local_t >= 0) & (local_t < local_vocab)
    # The max only stabilizes the exponentials; it cancels out of the loss and its gradient.
    m = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(lg, axis=-1)), "tensor")
    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(lg - m[..., None]), axis=-1), "tensor")
    picked = jnp.take_along_axis(lg, jnp.clip(local_t, 0, local_vocab - 1)[..., None], -1)[..., 0]
    target_logit = jax.lax.psum(jnp.where(here, picked, 0.0), "tensor")
    losses = jnp.log(sum_exp) + m - target_logit
    loss_sum, count = jnp.sum(losses * w), jnp.sum(w)
    if batch_axes:
      loss_sum, count = jax.lax.psum(loss_sum, batch_axes), jax.lax.psum(count, batch_axes)
    return loss_sum, count

  return jax.shard_map(per_device, mesh=mesh, in_specs=(logits_spec, row_spec, row_spec),
                       out_specs=(P(), P()), check_vma=False)(logits, targets, weights)


class TokenStats(NamedTuple):
  """Per-token statistics of the next-token distribution, float32 `[rows, seq]` each (None
  when not asked for)."""
  logps: jax.Array  # log p(target | prefix)
  entropy: jax.Array | None  # -sum_v p_v log p_v
  # log sum_v p_v^2 = logsumexp(2 z) - 2 logsumexp(z), gradient stopped: WPO's per-token
  # normaliser (TRL's `log_sum_sq_probs`).
  log_sum_sq_probs: jax.Array | None


def logit_stats(logits: jax.Array, targets: jax.Array, *, entropy: bool = False,
                sum_sq_probs: bool = False) -> TokenStats:
  """`TokenStats` of `[..., vocab]` logits (any float dtype, computed in float32) at `[...]`
  int targets; each field `[...]`."""
  z = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(z, axis=-1)
  # The target's logit by a masked sum rather than a gather: with the vocab split over
  # `tensor` it is a local select and a psum of `[...]`, where a gather would make the
  # partitioner collect each device's slice of the logits.
  is_target = jnp.arange(z.shape[-1]) == targets[..., None]
  logps = jnp.sum(jnp.where(is_target, z, 0.0), axis=-1) - lse
  ent = lssp = None
  if entropy:
    logp_all = z - lse[..., None]
    ent = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  if sum_sq_probs:
    lssp = jax.lax.stop_gradient(jax.nn.logsumexp(2.0 * z, axis=-1) - 2.0 * lse)
  return TokenStats(logps, ent, lssp)


def token_stats(model, hidden: jax.Array, targets: jax.Array, chunk_size: int = 0, *,
                entropy: bool = False, sum_sq_probs: bool = False) -> TokenStats:
  """log p(target) per position (and, when asked, the entropy and WPO's log sum_v p_v^2) from
  final hidden states, through `model.logits`: where the DPO family, the RL objectives and
  `lm_loss` with chunks turn hidden states into per-token log-probs (unchunked, `lm_loss`
  keeps `vocab_parallel_cross_entropy`).

  With the vocab split over `tensor` the partitioner splits each chunk's logits the same way
  (`logit_stats` reads the target's logit without a gather), so no device gathers them.

  Args:
    model: has `logits(hidden [rows, c, d_model]) -> [rows, c, vocab]`.
    hidden: `[rows, seq, d_model]`; targets: `[rows, seq]` int token ids.
    chunk_size: 0 (or >= seq) projects every position at once. > 0 runs the output
      projection and softmax over `chunk_size` positions at a time inside a `lax.scan`,
      recomputed in the backward pass (`jax.checkpoint`), so the `[rows, seq, vocab]`
      float32 logits never exist at once, only `[rows, chunk_size, vocab]`. A seq that is
      not a multiple of it gets a last chunk padded with positions whose outputs are
      dropped. Values and gradients equal the unchunked ones to float32 roundoff.
  Returns:
    `TokenStats`, each field float32 `[rows, seq]` or None.
  """
  if chunk_size < 0:
    raise ConfigError(f"TrainConfig.loss_chunk_size must be >= 0 (0: no chunks), got "
                      f"{chunk_size}")
  # None fields are empty pytrees: scan and checkpoint carry only the asked-for ones.
  per_chunk = lambda h, t: logit_stats(model.logits(h), t, entropy=entropy,
                                       sum_sq_probs=sum_sq_probs)
  rows, seq = targets.shape
  if not chunk_size or chunk_size >= seq:
    return per_chunk(hidden, targets)
  n = -(-seq // chunk_size)
  pad = n * chunk_size - seq
  if pad:  # the last chunk's padding: finite logits (0 hidden), outputs dropped below
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
  split = lambda x: x.reshape((rows, n, chunk_size) + x.shape[2:]).swapaxes(0, 1)
  chunk = jax.checkpoint(per_chunk)

  def body(carry, xs):
    index, h, t = xs
    with lora.fold_dropout_key(index):  # an lm_head adapter's dropout: a mask per chunk
      return carry, chunk(h, t)
  _, ys = jax.lax.scan(body, None, (jnp.arange(n), split(hidden), split(targets)))
  # [chunks, rows, chunk_size] -> [rows, seq], the padding dropped.
  return jax.tree.map(lambda y: y.swapaxes(0, 1).reshape(rows, n * chunk_size)[:, :seq], ys)


def lm_loss(model, batch: dict[str, jax.Array],
            chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """Next-token loss of `model` on a packed batch: (loss sum, target count).

  With `chunk_size > 0` the output projection and softmax run over `chunk_size` positions
  at a time and are recomputed in the backward pass (`token_stats`), so the `[batch, seq,
  vocab]` float32 logits never exist at once: the memory-lean path for 128k-256k
  vocabularies.
  """
  weights = target_weights(batch)
  if not chunk_size:
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return vocab_parallel_cross_entropy(logits, batch["targets"], weights)
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  logps = token_stats(model, hidden, batch["targets"], chunk_size).logps
  return -jnp.sum(logps * weights), jnp.sum(weights)


def lm_objective(chunk_size: int = 0):
  """`lm_loss` as a train-loop loss function: `(model, roles, batch) -> (sum, count, {})`."""
  def loss_fn(model, roles, batch):
    del roles  # the next-token loss reads the policy alone
    loss_sum, count = lm_loss(model, batch, chunk_size)
    return loss_sum, count, {}
  loss_fn.is_token_nll = True  # the loop reports exp(loss) as perplexity
  return loss_fn


def target_logps(model, batch: dict[str, jax.Array], window: int | None = None,
                 chunk_size: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(final hidden `[rows, seq, d_model]`, log p(target) `[rows, seq]`, the next-token
  entropy `[rows, seq]`), float32, of a packed batch (`tokens`, `targets`, `positions`,
  `segment_ids`): what the RL objectives read of a policy or its reference.

  With `window`, the output projection and softmax run only over each row's `window`
  positions from its first `loss_mask` target (a completion, which the sampler caps at
  `max_new_tokens`), and log-probs and entropy are 0 elsewhere: a prompt's positions cost no
  `[vocab]` logits, which for a 150k vocabulary and long prompts is most of the memory. A
  row's masked targets must all lie inside its window (`window >= max_new_tokens`).
  `chunk_size > 0` (`TrainConfig.loss_chunk_size`) then projects `chunk_size` of those
  positions at a time (`token_stats`), so not even `[rows, window, vocab]` exists at once.
  """
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets = batch["targets"]
  stats = lambda h, t: token_stats(model, h, t, chunk_size, entropy=True)[:2]
  if window is not None and window < targets.shape[1]:
    rows, seq = targets.shape
    start = jnp.argmax(batch["loss_mask"] > 0, axis=1)  # rows without targets: 0, masked anyway
    index = start[:, None] + jnp.arange(window)  # [rows, window]
    inside = index < seq
    index = jnp.minimum(index, seq - 1)  # clipped duplicates carry 0 into the scatter below
    h = jnp.take_along_axis(hidden, index[..., None], axis=1)
    logps, entropy = stats(h, jnp.take_along_axis(targets, index, axis=1))
    row = jnp.arange(rows)[:, None]
    scatter = lambda x: jnp.zeros((rows, seq), jnp.float32).at[row, index].add(
        jnp.where(inside, x, 0.0))
    return hidden, scatter(logps), scatter(entropy)
  return (hidden, *stats(hidden, targets))
