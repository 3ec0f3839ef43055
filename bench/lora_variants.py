"""The train-step variants the LoRA benchmarks compare, built the way the train loop builds them.

Shared by `lora_memory.py` (abstract shapes, compiled memory), `lora_step_time.py`
(concrete arrays, timed steps) and `pretrain_throughput.py` (`train_step`, `random_batch`); it
defines no flags, so every script can import it.

Variants (each is `roles.policy_role` plus a trainable filter, as a stage would make it):
  full:   every `nnx.Param` trains (full fine-tuning).
  lora:   adapters (`nnx.LoRAParam`) train; the base stays frozen in `param_dtype`.
  qlora:  as lora, over a base quantized to NF4 (the int4 kernel runs the base matmuls).
  frozen: only the first block's `input_norm` weight trains. The gradient must still travel
          from the loss down through every block to reach it, but no projection weight gets a
          gradient: the forward+backward floor that a LoRA step adds its adapters to.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx

from llmjax.model import lora, quant
from llmjax.model.config import ModelConfig
from llmjax.parallel import mesh as mesh_lib
from llmjax.train import loop, roles
from llmjax.train.losses import lm_objective
from llmjax.train.optimizer import (OptimizerConfig, build_optimizer, decay_mask,
                                    learning_rate_schedule)

VARIANTS = ("full", "lora", "qlora", "frozen")
# Long enough that the warm-up part of the schedule is irrelevant to what is measured.
TOTAL_STEPS = 1000


def lora_config(variant: str, rank: int, lora_kernel: str, quant_kernel: str,
                group_size: int = 64) -> lora.LoraConfig | None:
  """The LoraConfig of a variant: all seven block projections adapted, as the issue asks."""
  if variant not in ("lora", "qlora"):
    return None
  base = (quant.QuantConfig(scheme="nf4", group_size=group_size, kernel=quant_kernel)
          if variant == "qlora" else None)
  return lora.LoraConfig(rank=rank, alpha=2.0 * rank, kernel=lora_kernel, quantize_base=base)


def _first_input_norm(path, value) -> bool:
  return isinstance(value, nnx.Param) and tuple(path[:3]) == ("layers", 0, "input_norm")


def variant_role(cfg: ModelConfig, variant: str, lora_cfg: lora.LoraConfig | None,
                 init: Any = None) -> roles.Role:
  """The policy role of a variant. `init`: the float base params (LoRA needs a base)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")
  if lora_cfg is not None:
    # policy_role refuses LoRA without a base; the abstract path passes a placeholder, since
    # only shapes matter there and `build(None)` keeps the random init.
    return roles.policy_role(cfg, init if init is not None else object(), lora_cfg)
  role = roles.policy_role(cfg, init)
  if variant == "frozen":
    role.trainable = _first_input_norm
  return role


def abstract_split(role: roles.Role):
  """(graphdef, trainable, frozen) as ShapeDtypeStructs: nothing is allocated."""
  model = nnx.eval_shape(lambda: role.build(None))
  return nnx.split(model, role.trainable, ...)


def placed_split(role: roles.Role):
  """(graphdef, trainable, frozen) as arrays, built by one jitted call as the loop does."""
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig())
  graphdef, trainable, frozen, _, _ = loop._place_role(role, mesh,
                                                       mesh_lib.RULE_SETS["fsdp_tensor"])
  return graphdef, trainable, frozen


def optimizer(trainable) -> tuple[Any, Any]:
  """(tx, schedule): the loop's AdamW with clipping and its decay mask, default settings."""
  opt = OptimizerConfig()
  tx = build_optimizer(opt, TOTAL_STEPS, decay_mask({roles.POLICY: trainable}, opt))
  return tx, learning_rate_schedule(opt, TOTAL_STEPS)


def train_step(graphdef, tx, schedule, loss_chunk_size: int = 0, grad_accum_steps: int = 1,
               loss_scale=None):
  """The loop's jitted step, the train state donated as `loop.train` does (`loss_scale`:
  float16's, as `TrainConfig.resolved_loss_scale` gives it; the state must carry it)."""
  step = loop.make_train_step({roles.POLICY: graphdef}, tx, schedule,
                              lm_objective(loss_chunk_size), grad_accum_steps, loss_scale)
  return jax.jit(step, donate_argnums=0)


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random tokens packed as two documents per row (as in pretrain_throughput.py)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, vocab, (batch, seq + 1), dtype=np.int32)
  half = seq // 2
  segment = np.where(np.arange(seq) < half, 1, 2).astype(np.int32)
  positions = np.where(np.arange(seq) < half, np.arange(seq), np.arange(seq) - half)
  return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
          "loss_mask": np.ones((batch, seq), np.int32),
          "segment_ids": np.broadcast_to(segment, (batch, seq)).copy(),
          "positions": np.broadcast_to(positions.astype(np.int32), (batch, seq)).copy()}


def abstract_batch(batch: int, seq: int) -> dict[str, jax.ShapeDtypeStruct]:
  return {k: jax.ShapeDtypeStruct((batch, seq), np.int32)
          for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}


def count(tree) -> int:
  """Elements in a tree of arrays or ShapeDtypeStructs."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def nbytes(tree) -> int:
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
