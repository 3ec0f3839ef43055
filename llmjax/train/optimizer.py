"""AdamW with linear warmup, cosine decay and global-norm clipping (optax)."""

from __future__ import annotations

import dataclasses
from typing import Any

import gin
import jax
import optax

from llmjax.errors import ConfigError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW hyperparameters; the schedule's length is the stage's `total_steps`."""
  learning_rate: float = 3e-4
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1  # the cosine ends at learning_rate * min_lr_ratio
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip_norm: float | None = 1.0
  # Decay the token embedding (and a tied output head with it). Norm scales and biases are
  # never decayed; LoRA's A and B are decayed like any other weight matrix, as peft + the HF
  # Trainer do (set weight_decay = 0.0 for the common LoRA recipes that do not).
  decay_embeddings: bool = True

  def __post_init__(self):
    if self.learning_rate <= 0:
      raise ConfigError(f"OptimizerConfig.learning_rate must be positive, got {self.learning_rate}")
    if self.warmup_steps < 0:
      raise ConfigError(f"OptimizerConfig.warmup_steps must be >= 0, got {self.warmup_steps}")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then cosine decay to the floor at `total_steps`."""
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.min_lr_ratio)


def decay_mask(trainables: Any, cfg: OptimizerConfig) -> Any:
  """A tree of bools shaped like `trainables` (nnx states): True where AdamW decays.

  Decided by name and logical axes, not by rank: Qwen2's q/k/v biases are `[heads,
  head_dim]`, two-dimensional like a weight, and must not shrink toward zero.
  """
  from flax import nnx

  def decays(path, v) -> bool:
    name = str(getattr(path[-1], "key", getattr(path[-1], "name", path[-1])))
    axes = v.get_metadata().get("logical_axes") or ()
    if name.endswith("bias") or "norm" in axes:
      return False
    if name == "embed" and not cfg.decay_embeddings:
      return False
    return True
  return jax.tree_util.tree_map_with_path(
      lambda path, v: v.replace(decays(path, v)), trainables,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


def build_optimizer(cfg: OptimizerConfig, total_steps: int,
                    mask: Any = None) -> optax.GradientTransformation:
  """The optax chain: clip by global norm, then AdamW on the schedule.

  `mask` (from `decay_mask`) says which parameters are decayed; None: those of rank >= 2.
  """
  mask = mask if mask is not None else (lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
  adamw = optax.adamw(learning_rate_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2,
                      eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
  if cfg.grad_clip_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
