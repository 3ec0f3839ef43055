"""Reward models: a transformer with the score head (`ModelConfig.head='score'`).

A reward model scores a whole sequence by the score at its last token, the token Hugging
Face's `*ForSequenceClassification` reads (the last non-pad one). Three ways to get it:

  `score_sequences`     Python lists of token ids -> numpy scores (padding, batching, jit);
  `end_scores`          jittable, right-padded `[batch, seq]` + lengths -> `[batch]`, for
                        on-device use (e.g. scoring a PPO rollout);
  `sequence_end_mask`   the last token of every document of packed rows, for training on
                        packed batches.

`init_reward_model` turns a language model (e.g. an SFT checkpoint) into the starting point
of a reward model: every transformer weight copied, lm_head dropped, the score head fresh.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llmjax.buckets import pow2_at_least
from llmjax.errors import CheckpointError, ConfigError
from llmjax.model.config import ModelConfig

_MIN_LEN_BUCKET = 16


def refuse_generation(cfg: ModelConfig, what: str = "the model") -> None:
  """ConfigError when `cfg` is a reward model: samplers and generation call this first."""
  if cfg.head == "score":
    raise ConfigError(f"{what} is a reward model (head 'score'); it scores text, it does not "
                      "generate: use llmjax.model.reward.score_sequences, or a model with "
                      "head 'lm'")


def sequence_end_mask(segment_ids: jax.Array) -> jax.Array:
  """`[batch, seq]` bool: True at the last token of every document of a packed row.

  Args:
    segment_ids: `[batch, seq]` int, 1, 2, ... per document, 0 = padding (the data
      pipeline's layout).
  Returns:
    True where the token is not padding and the next token belongs to another segment, is
    padding, or does not exist (the row ends).
  """
  nxt = jnp.concatenate([segment_ids[:, 1:], jnp.zeros_like(segment_ids[:, :1])], axis=1)
  return (segment_ids != 0) & (nxt != segment_ids)


def end_scores(model: Any, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
  """Score of each right-padded row at its last real token; jittable.

  Args:
    model: a Transformer with head 'score' (or a LoRA/quantized one).
    tokens: `[batch, seq]` int, each row's tokens first, then any padding (causal attention:
      padding after a token never changes its score, so its value does not matter).
    lengths: `[batch]` int, real tokens per row, 1 <= length <= seq.
  Returns:
    `[batch]` float32.
  """
  scores = model(tokens)  # [batch, seq]
  last = jnp.clip(lengths.astype(jnp.int32) - 1, 0, tokens.shape[1] - 1)
  return jnp.take_along_axis(scores, last[:, None], axis=1)[:, 0]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _end_scores(graphdef: nnx.GraphDef, params: Any, tokens: jax.Array,
                lengths: jax.Array) -> jax.Array:
  return end_scores(nnx.merge(graphdef, params), tokens, lengths)


def score_sequences(graphdef: nnx.GraphDef, params: Any, sequences: Sequence[Sequence[int]],
                    max_batch: int = 64) -> np.ndarray:
  """Scores of token sequences by a reward model: `[n]` float32 numpy.

  Each sequence is scored at its last token, which is what HF's *ForSequenceClassification
  reads for a right-padded row (the last token that is not pad_token_id, so a sequence
  must not end in the pad id for the two to agree). Rows are right-padded into
  power-of-two buckets (rows up to `max_batch`, length from 16), so many calls compile a
  handful of programs.
  """
  if not sequences:
    raise ConfigError("score_sequences() needs at least one sequence")
  empty = [i for i, s in enumerate(sequences) if len(s) == 0]
  if empty:
    raise ConfigError(f"sequences {empty[:5]} are empty: a score is read at a sequence's last "
                      "token, so each needs at least one")
  if max_batch < 1:
    raise ConfigError(f"score_sequences(): max_batch must be at least 1, got {max_batch}")
  out = []
  rows = min(pow2_at_least(len(sequences)), pow2_at_least(max_batch))
  for start in range(0, len(sequences), rows):
    chunk = [list(s) for s in sequences[start:start + rows]]
    width = pow2_at_least(max(len(s) for s in chunk), _MIN_LEN_BUCKET)
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones((rows,), np.int32)  # filler rows: one padding token, discarded
    for i, s in enumerate(chunk):
      tokens[i, :len(s)], lengths[i] = s, len(s)
    scores = _end_scores(graphdef, params, jnp.asarray(tokens), jnp.asarray(lengths))
    out.append(np.asarray(jax.device_get(scores))[:len(chunk)])
  return np.concatenate(out).astype(np.float32)


def reward_config(cfg: ModelConfig) -> ModelConfig:
  """The reward-model twin of a language model's config (`head='score'`)."""
  return dataclasses.replace(cfg, head="score")


def init_reward_model(lm_params: nnx.State, cfg: ModelConfig, seed: int = 0) -> nnx.State:
  """The starting state of a reward model from a language model's float state.

  Args:
    lm_params: `nnx.State` of a plain float `Transformer` with head 'lm' (merge LoRA and
      dequantize first: `LoadedRun.float_params()`).
    cfg: the reward model's config (head 'score'); every other shape field must describe
      `lm_params`' transformer (tie_embeddings may differ: a reward model has no lm_head).
    seed: initialization of the score head, normal(0, cfg.init_std).
  Returns:
    `nnx.State` of `build_model(cfg)`: embedding, blocks and final norm copied from
    `lm_params` (cast to cfg.param_dtype), lm_head dropped, `score [d_model, 1]` fresh.
  """
  from llmjax.model.transformer import build_model
  if cfg.head != "score":
    raise ConfigError(f"init_reward_model(): cfg has head {cfg.head!r}; pass the reward "
                      "model's config, e.g. llmjax.model.reward.reward_config(lm_cfg)")
  abstract = nnx.state(nnx.eval_shape(lambda: build_model(cfg)))
  source = dict(nnx.to_flat_state(lm_params))
  target = nnx.to_flat_state(abstract)
  dtype = jnp.dtype(cfg.param_dtype)
  extra = sorted("/".join(map(str, p)) for p in source
                 if p not in dict(target) and p != ("lm_head",))
  if extra:
    raise CheckpointError(f"init_reward_model(): lm_params has {extra[:4]}, which a plain "
                          "float language model does not: merge LoRA adapters and dequantize "
                          "first (LoadedRun.float_params())")
  score = jax.random.normal(jax.random.key(seed), (cfg.d_model, 1), jnp.float32)
  leaves = []
  for path, var in target:
    if path == ("score",):
      leaves.append((path, var.replace(cfg.init_std * score.astype(dtype))))
      continue
    name = "/".join(map(str, path))
    if path not in source:
      raise CheckpointError(f"init_reward_model(): lm_params lacks {name}: it is not the "
                            "state of a language model of this config")
    value = source[path].get_value()
    if tuple(value.shape) != tuple(var.get_value().shape):
      raise CheckpointError(f"init_reward_model(): {name} has shape {list(value.shape)} in "
                            f"lm_params but {list(var.get_value().shape)} in cfg's model: cfg "
                            "must be the language model's config with head='score'")
    leaves.append((path, var.replace(jnp.asarray(value).astype(dtype))))
  return nnx.from_flat_state(leaves)


class ValueHead(nnx.Module):
  """PPO's value head on a policy's own final hidden states (a trunk shared with the policy):
  `[batch, seq, d_model]` -> `[batch, seq]` float32, initialised like the score head."""

  def __init__(self, cfg: ModelConfig, seed: int = 0):
    init = cfg.init_std * jax.random.normal(jax.random.key(seed), (cfg.d_model, 1), jnp.float32)
    self.score = nnx.Param(init, logical_axes=("embed", None))

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return jnp.einsum("bsd,do->bso", hidden.astype(jnp.float32), self.score[...])[..., 0]

