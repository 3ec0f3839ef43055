"""Pure loss functions. Each returns sums, not means, so microbatches and hosts add up exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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


def lm_loss(model, batch: dict[str, jax.Array],
            chunk_size: int = 0) -> tuple[jax.Array, jax.Array]:
  """Next-token loss of `model` on a packed batch: (loss sum, target count).

  With `chunk_size > 0` the output projection and softmax run over `chunk_size` positions
  at a time and are recomputed in the backward pass, so the `[batch, seq, vocab]` float32
  logits never exist at once: the memory-lean path for 128k-256k vocabularies.
  """
  weights = target_weights(batch)
  if not chunk_size:
    logits = model(batch["tokens"], batch["positions"], batch["segment_ids"])
    return vocab_parallel_cross_entropy(logits, batch["targets"], weights)
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  b, s, d = hidden.shape
  if s % chunk_size:
    raise ValueError(f"seq_len {s} is not a multiple of the loss chunk size {chunk_size}")
  split = lambda x: x.reshape((b, s // chunk_size, chunk_size) + x.shape[2:]).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_loss(h, t, w):
    return token_cross_entropy(model.logits(h), t, w)

  def body(carry, xs):
    loss_sum, count = chunk_loss(*xs)
    return (carry[0] + loss_sum, carry[1] + count), None
  zero = jnp.zeros((), jnp.float32)
  (loss_sum, count), _ = jax.lax.scan(body, (zero, zero),
                                      (split(hidden), split(batch["targets"]), split(weights)))
  return loss_sum, count


def lm_objective(chunk_size: int = 0):
  """`lm_loss` as a train-loop loss function: `(model, roles, batch) -> (sum, count, {})`."""
  def loss_fn(model, roles, batch):
    del roles  # the next-token loss reads the policy alone
    loss_sum, count = lm_loss(model, batch, chunk_size)
    return loss_sum, count, {}
  loss_fn.is_token_nll = True  # the loop reports exp(loss) as perplexity
  return loss_fn


def target_logps(model, batch: dict[str, jax.Array], window: int | None = None
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(final hidden `[rows, seq, d_model]`, log p(target) `[rows, seq]`, the next-token
  entropy `[rows, seq]`), float32, of a packed batch (`tokens`, `targets`, `positions`,
  `segment_ids`): what the RL objectives read of a policy or its reference.

  With `window`, the output projection and softmax run only over each row's `window`
  positions from its first `loss_mask` target (a completion, which the sampler caps at
  `max_new_tokens`), and log-probs and entropy are 0 elsewhere: a prompt's positions cost no
  `[vocab]` logits, which for a 150k vocabulary and long prompts is most of the memory. A
  row's masked targets must all lie inside its window (`window >= max_new_tokens`).
  """
  hidden = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
  targets = batch["targets"]
  if window is not None and window < targets.shape[1]:
    rows, seq = targets.shape
    start = jnp.argmax(batch["loss_mask"] > 0, axis=1)  # rows without targets: 0, masked anyway
    index = start[:, None] + jnp.arange(window)  # [rows, window]
    inside = index < seq
    index = jnp.minimum(index, seq - 1)  # clipped duplicates carry 0 into the scatter below
    h = jnp.take_along_axis(hidden, index[..., None], axis=1)
    logps, entropy = _logps_and_entropy(model, h, jnp.take_along_axis(targets, index, axis=1))
    row = jnp.arange(rows)[:, None]
    scatter = lambda x: jnp.zeros((rows, seq), jnp.float32).at[row, index].add(
        jnp.where(inside, x, 0.0))
    return hidden, scatter(logps), scatter(entropy)
  return (hidden, *_logps_and_entropy(model, hidden, targets))


def _logps_and_entropy(model, hidden: jax.Array, targets: jax.Array):
  logp_all = jax.nn.log_softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
  logps = jnp.take_along_axis(logp_all, targets[..., None], axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logps, entropy
