"""Quantized checkpoints (`llmjax-quantize` output) on disk, and the loss used to judge them."""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from flax import nnx

from llmjax.checkpoint import Checkpointer, abstract_like
from llmjax.errors import CheckpointError
from llmjax.model.config import ModelConfig
from llmjax.model.quant import QuantConfig, quantize_model
from llmjax.model.transformer import build_model

QUANTIZED_STAGE = "quantized"  # the checkpoint directory under <workdir>/checkpoints/


def quantized_abstract(model_cfg: ModelConfig, cfg: QuantConfig
                       ) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, ShapeDtypeStruct state) of the quantized model: a restore target."""
  return nnx.split(nnx.eval_shape(lambda: quantize_model(build_model(model_cfg), cfg)))


@functools.partial(jax.jit, static_argnums=0)
def _loss_sums(graphdef, state, batch):
  from llmjax.train.losses import lm_loss
  return lm_loss(nnx.merge(graphdef, state), batch)


def eval_loss(graphdef: nnx.GraphDef, state: nnx.State, batches: list[dict[str, Any]]
              ) -> float:
  """Mean next-token loss (nats per target token) of the model over packed `batches`."""
  total = count = 0.0
  for batch in batches:
    s, c = _loss_sums(graphdef, state, batch)
    total, count = total + float(s), count + float(c)
  return total / max(count, 1.0)


def quantization_meta(cfg: QuantConfig) -> dict[str, Any]:
  """What a quantized checkpoint records about its quantization (not the kernel)."""
  return {"scheme": cfg.scheme, "group_size": cfg.group_size,
          "quantize_lm_head": cfg.quantize_lm_head}


def save_quantized(workdir: str, step: int, state: nnx.State, meta: dict[str, Any]) -> str:
  """Writes `state` to `<workdir>/checkpoints/quantized/<step>/` with `meta`; returns it.

  `meta` must hold 'model' (the ModelConfig dict) and 'quantization' (`quantization_meta`).
  """
  directory = os.path.join(workdir, "checkpoints", QUANTIZED_STAGE)
  ckpt = Checkpointer(directory, every=1, async_save=False)
  try:
    ckpt.save_params_only(step, state, {"stage": QUANTIZED_STAGE, "step": step, **meta})
    ckpt.wait()
  finally:
    ckpt.close()
  return os.path.join(directory, str(step))


def restore_quantized(ckpt: Checkpointer, step: int, meta: dict[str, Any],
                      kernel: str | None = None) -> tuple[nnx.GraphDef, nnx.State]:
  """The quantized model at `step` of `ckpt` (whose `meta` records the quantization).

  `kernel` ('pallas' or 'reference') picks the int4 matmul; None takes
  `QuantConfig.kernel` from gin.
  """
  model_cfg = ModelConfig.from_dict(meta["model"])
  q = meta["quantization"]
  cfg = QuantConfig(q["scheme"], q["group_size"], kernel or QuantConfig().kernel,
                    q["quantize_lm_head"])
  graphdef, abstract = quantized_abstract(model_cfg, cfg)
  return graphdef, ckpt.restore_params(step, abstract_like(abstract))


def load_quantized(workdir: str, step: int | None = None, kernel: str | None = None):
  """A quantized checkpoint written by `llmjax-quantize`, as a `runs.load.LoadedRun`."""
  from llmjax.runs.load import load_run
  directory = os.path.join(workdir, "checkpoints", QUANTIZED_STAGE)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no quantized checkpoint in {workdir} (expected {directory}): "
                          f"write one with llmjax-quantize --output={workdir}")
  return load_run(workdir, QUANTIZED_STAGE, step, kernel=kernel)
