"""The models a train step holds, by role: the policy being trained, and the others it reads.

A `Role` says how to build a model from starting arrays and which of its variables train
(an nnx filter: `nnx.Param` for full fine-tuning, `nnx.LoRAParam` for LoRA, `nnx.Nothing` for
a frozen model). Roles follow Tunix's names: `policy` (the model being trained), `reference`
(the frozen model a KL or DPO term compares against), `reward`, `teacher`, and `value` (a
second trainable model beside the policy). The loop builds every role with one jitted
function per role, placed on the mesh by the same logical-axis rules.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import jax
from flax import nnx

from llmjax.errors import ConfigError
from llmjax.model import lora, quant, router_losses
from llmjax.model.config import ModelConfig
from llmjax.model.transformer import build_model

POLICY = "policy"
REFERENCE = "reference"
REWARD = "reward"  # PPO's frozen reward model
VALUE = "value"  # PPO's value model (trained beside the policy)


@dataclasses.dataclass
class Role:
  """How the loop gets one model of the step.

  Attributes:
    build: starting arrays (`init`, or None) -> the model. Traced under `jax.jit` (no I/O),
      so the arrays come out already sharded and unused random initializations vanish.
    init: the arrays `build` starts from (e.g. the previous stage's parameters), or None.
    trainable: nnx filter of the variables that get gradients and optimizer state; the rest
      of the model is frozen: a step argument that is neither donated nor checkpointed.
    config: the model's config (FLOPs, the checkpoint's shape check).
  """
  build: Callable[[Any], nnx.Module]
  init: Any = None
  trainable: Any = nnx.Param
  config: ModelConfig | None = None

  @classmethod
  def frozen(cls, graphdef: nnx.GraphDef, params: Any,
             config: ModelConfig | None = None) -> "Role":
    """An already-built model that does not train (a reference, reward or teacher model)."""
    return cls(lambda p: nnx.merge(graphdef, p), params, nnx.Nothing, config)


class Frozen:
  """A frozen role's model as a loss function sees it: every method's outputs carry no
  gradient, LoRA dropout never runs in it, and an MoE model's routing adds no router loss
  (frozen by construction, whatever the loss does with it)."""

  def __init__(self, model: nnx.Module):
    self._model = model

  def __getattr__(self, name: str) -> Any:
    attr = getattr(self._model, name)
    if not callable(attr):
      return attr

    @functools.wraps(attr)
    def frozen_call(*args, **kwargs):
      with lora.dropout_key(None), router_losses.not_recorded():
        return jax.tree.map(jax.lax.stop_gradient, attr(*args, **kwargs))
    return frozen_call

  def __call__(self, *args, **kwargs):
    return self.__getattr__("__call__")(*args, **kwargs)


def policy_role(cfg: ModelConfig, init: Any = None, lora_cfg: lora.LoraConfig | None = None,
                seed: int = 0) -> Role:
  """The transformer of `cfg`, from `init` (float parameters) or a random init.

  With `lora_cfg`, the base is frozen (quantized first for QLoRA) and adapters train.
  """
  if lora_cfg is not None and init is None:
    raise ConfigError("LoRA needs a base model to adapt, and this stage has none: start it "
                      "after a stage that trains one, or set its init_from to a run or an "
                      "llmjax-import")

  def build(params):
    model = build_model(cfg, seed)
    if params is not None:
      nnx.update(model, params)
    if lora_cfg is not None:
      if lora_cfg.quantize_base is not None:
        quant.quantize_model(model, lora_cfg.quantize_base)
      lora.add_lora(model, lora_cfg)
    return model
  return Role(build, init, trainable_filter(cfg, lora_cfg is not None), cfg)


def trainable_filter(cfg: ModelConfig, lora_run: bool) -> Any:
  """What trains: every parameter, or LoRA's adapters (and a reward model's score head,
  which is new and has no base weights to adapt, as peft's `modules_to_save`)."""
  if not lora_run:
    return nnx.Param
  if cfg.head == "score":
    return nnx.Any(nnx.LoRAParam, nnx.PathContains("score"))
  return nnx.LoRAParam


def reference_model(policy: nnx.Module, roles: Mapping[str, Any]) -> Any:
  """The frozen model a preference or KL term compares the policy with.

  An explicit `reference` role wins; otherwise a LoRA policy serves as its own reference
  with its adapters off (`lora.WithoutAdapters`): the base weights are held once.
  """
  if REFERENCE in roles:
    return roles[REFERENCE]
  if not lora.has_lora(policy):
    raise ConfigError("this loss needs a reference model: give the stage a 'reference' role "
                      "(e.g. reference_from = an earlier stage), or train with LoRA, whose "
                      "base model is the reference")
  return lora.WithoutAdapters(policy)
