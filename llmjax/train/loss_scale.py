"""Loss scaling for float16 compute: pure functions over a small state in the train state.

float16 has a 5-bit exponent: gradients below ~6e-8 flush to zero and values above 65504
overflow. The step multiplies the loss by `scale` before differentiating, so small gradients
stay representable through the float16 backward pass, and divides the float32 parameter
gradients by it again. A dynamic scale (as `jmp.DynamicLossScale` and PyTorch's GradScaler)
halves whenever the gradients are not finite, and that step is skipped: parameters and
optimizer state stay as they were. After `growth_interval` finite steps in a row it doubles,
probing for the largest scale that does not overflow. bfloat16 has float32's exponent range
and needs none of this.

The scale multiplies the *mean* loss of a microbatch (the loop divides the summed loss by
its token weight first), so one scale fits any batch size: the convention of jmp and PyTorch,
where 2**15 is the usual start.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# {'scale': float32 [], 'good_steps': int32 [] (finite steps since the last change),
#  'skipped_steps': int32 [] (cumulative)}; a plain dict, so it checkpoints like the rest.
LossScaleState = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LossScale:
  """How the scale starts and moves. `dynamic=False`: a fixed scale that never changes and
  never skips a step (a non-finite step is then a divergence, as without scaling)."""
  initial: float = 2.0 ** 15
  dynamic: bool = True
  growth_interval: int = 2000  # finite steps in a row before the scale grows
  factor: float = 2.0  # grows by this factor, backs off by its inverse
  min_scale: float = 1.0  # backing off below this stops the run: float16 overflows unscaled


def init(cfg: LossScale) -> LossScaleState:
  return {"scale": jnp.asarray(cfg.initial, jnp.float32),
          "good_steps": jnp.zeros((), jnp.int32),
          "skipped_steps": jnp.zeros((), jnp.int32)}


def scale_loss(loss: jax.Array, state: LossScaleState) -> jax.Array:
  """`loss * scale`, the quantity to differentiate."""
  return loss * state["scale"].astype(loss.dtype)


def unscale_grads(grads: Any, state: LossScaleState, times: jax.Array | float = 1.0) -> Any:
  """Each leaf times `times / scale`, in its own dtype (float32 for float32 master weights).

  `times` undoes a normalization folded into the scaled loss in the same pass (the loop
  scales a microbatch's mean loss and wants the gradient of its sum: `times` = its weight).
  """
  factor = jnp.asarray(times, jnp.float32) / state["scale"]
  return jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)


def update(state: LossScaleState, grads_finite: jax.Array, cfg: LossScale) -> LossScaleState:
  """The state after a step whose gradients were (not) finite.

  Finite: one more good step; at `growth_interval` of them the scale grows by `factor`
  (unless that would overflow float32) and the count restarts. Not finite: the scale backs
  off by `factor`, the count restarts and the step counts as skipped. A fixed scale
  (`dynamic=False`) never changes and skips nothing.
  """
  if not cfg.dynamic:
    return state
  scale, good = state["scale"], state["good_steps"]
  grow = good + 1 >= cfg.growth_interval
  grown = scale * cfg.factor
  scale_ok = jnp.where(grow & jnp.isfinite(grown), grown, scale)
  return {"scale": jnp.where(grads_finite, scale_ok, scale / cfg.factor),
          "good_steps": jnp.where(grads_finite & ~grow, good + 1, 0).astype(jnp.int32),
          "skipped_steps": state["skipped_steps"] + jnp.where(grads_finite, 0, 1).astype(
              jnp.int32)}


def below_floor(state: LossScaleState, cfg: LossScale) -> jax.Array:
  """True once the scale has backed off below `min_scale`: the overflow is not the scale's."""
  return state["scale"] < cfg.min_scale


def from_settings(setting: str | float | None, compute_dtype: str, *, initial: float,
                  growth_interval: int, factor: float, min_scale: float) -> LossScale | None:
  """The loss scale a run uses (None: no scaling), from `TrainConfig.loss_scale*`.

  `setting`: None picks by compute dtype ('dynamic' for float16, 'none' otherwise);
  'dynamic'; 'none'; or a number, a fixed scale. Scaling is refused for float32 and bfloat16
  compute, whose exponent range is float32's: nothing underflows that scaling would save.
  """
  from llmjax.errors import ConfigError
  if setting is None:
    setting = "dynamic" if compute_dtype == "float16" else "none"
  if isinstance(setting, str):
    if setting not in ("dynamic", "none"):
      raise ConfigError(f"TrainConfig.loss_scale must be 'dynamic', 'none', a positive number "
                        f"(a fixed scale) or None (by dtype), got {setting!r}")
    if setting == "none":
      return None
  elif not (isinstance(setting, (int, float)) and setting > 0):
    raise ConfigError(f"TrainConfig.loss_scale must be 'dynamic', 'none', a positive number "
                      f"(a fixed scale) or None (by dtype), got {setting!r}")
  if compute_dtype != "float16":
    why = ("has float32's exponent range" if compute_dtype == "bfloat16"
           else "does not underflow where float16 does")
    raise ConfigError(
        f"TrainConfig.loss_scale={setting!r} is for float16 compute, but ModelConfig.dtype is "
        f"{compute_dtype!r}, which {why} and needs no loss scaling. Leave "
        "TrainConfig.loss_scale unset (or 'none').")
  if setting == "dynamic":
    return LossScale(initial=float(initial), dynamic=True, growth_interval=growth_interval,
                     factor=float(factor), min_scale=float(min_scale))
  return LossScale(initial=float(setting), dynamic=False, min_scale=0.0)
