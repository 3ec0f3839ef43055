"""Quantize a run's checkpoint into a new workdir and report what it cost (`llmjax-quantize`).

The output is a workdir of its own: `<output>/checkpoints/quantized/<step>/` (Orbax, read by
`quantized.load_quantized`), a copy of the tokenizer, and `<output>/quant_report.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

from flax import nnx

from llmjax.data import pipeline
from llmjax.errors import CheckpointError
from llmjax.model import quant
from llmjax.runs import quantized
from llmjax.runs.load import load_run, saved_stages

REPORT_FILE = "quant_report.json"


def _eval_batches(run, data: pipeline.DataConfig) -> list[dict[str, Any]]:
  if run.tokenizer is None:
    raise CheckpointError("the run has no tokenizer to encode eval data with: pass "
                          "--eval_batches=0 to quantize without the loss comparison")
  _, eval_docs = pipeline.document_sources(data)
  return pipeline.eval_batches(data, run.tokenizer, eval_docs)


def quantize_run(workdir: str, output: str, cfg: quant.QuantConfig, *,
                 stage: str | None = None, step: int | None = None,
                 eval_data: pipeline.DataConfig | None = None,
                 overwrite: bool = False) -> dict[str, Any]:
  """Loads a float checkpoint, quantizes it, saves it under `output`; returns the report.

  Args:
    workdir, stage, step: the checkpoint to quantize (defaults as in `load_run`).
    output: the workdir to write; its quantized checkpoint has the source's step number.
    cfg: scheme, group size, and the kernel used for the report's quantized eval.
    eval_data: held-out batches (`eval_batches` of them) on which the float and quantized
      losses are compared; None skips the comparison.
    overwrite: replace an existing quantized checkpoint in `output`.
  """
  from llmjax.train.losses import target_weights

  if os.path.isdir(os.path.join(workdir, "checkpoints", quantized.QUANTIZED_STAGE)) and \
      stage in (None, quantized.QUANTIZED_STAGE):
    raise CheckpointError(f"{workdir} holds a quantized checkpoint: quantize the float run "
                          f"it came from (its 'source' in {REPORT_FILE})")
  others = [s for s in saved_stages(output) if s != quantized.QUANTIZED_STAGE]
  if others:
    raise CheckpointError(f"--output={output} is the workdir of another run (it holds the "
                          f"checkpoints of {others}); quantize into a new directory")
  target = os.path.join(output, "checkpoints", quantized.QUANTIZED_STAGE)
  if os.path.exists(target):
    if not overwrite:
      raise CheckpointError(f"{target} already exists: choose another --output or pass "
                            "--overwrite")
    shutil.rmtree(target)

  run = load_run(workdir, stage, step)
  batches = _eval_batches(run, eval_data) if eval_data else []  # fail before the work
  graphdef_f, params_f = run.float_model()  # a LoRA run quantizes with its adapters merged
  graphdef_q, state_q = nnx.split(quant.quantize_model(nnx.merge(graphdef_f, params_f),
                                                       cfg))
  tok_file = run.meta.get("tokenizer", "tokenizer.model")
  os.makedirs(output, exist_ok=True)
  if tok_file:
    shutil.copyfile(os.path.join(workdir, tok_file), os.path.join(output, tok_file))
  source = {"workdir": os.path.abspath(workdir), "stage": run.stage, "step": run.step}
  meta = {"model": dataclasses.asdict(run.model_cfg), "tokenizer": tok_file,
          "quantization": quantized.quantization_meta(cfg), "source": source}
  path = quantized.save_quantized(output, run.step, state_q, meta)

  before, after = quant.weight_bytes(params_f), quant.weight_bytes(state_q)
  report: dict[str, Any] = {
      "checkpoint": path, "source": source, "scheme": cfg.scheme,
      "group_size": cfg.group_size if cfg.scheme != "int8" else None,
      "kernel": cfg.kernel, "quantize_lm_head": cfg.quantize_lm_head,
      "bytes": {
          "float_total": before["total"], "quantized_total": after["total"],
          "quantized_weights": after["quantized"],
          # The float bytes of the weights that were quantized (the rest is unchanged).
          "quantized_weights_as_float": before["total"] - after["float"],
          "bits_per_quantized_weight": 8 * after["quantized"] / max(after["quantized_params"], 1),
          "compression": before["total"] / after["total"]},
  }
  if batches:
    float_loss = quantized.eval_loss(graphdef_f, params_f, batches)
    quant_loss = quantized.eval_loss(graphdef_q, state_q, batches)
    report["eval"] = {
        "batches": len(batches),
        "target_tokens": int(sum(float(target_weights(b).sum()) for b in batches)),
        "float_loss": float_loss, "quantized_loss": quant_loss,
        "loss_increase": quant_loss - float_loss,
        "relative_increase": (quant_loss - float_loss) / float_loss}
  with open(os.path.join(output, REPORT_FILE), "w") as f:
    json.dump(report, f, indent=2)
  return report
