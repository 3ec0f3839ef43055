"""A run's model from its checkpoints: which stage, which step, and what kind of checkpoint.

A workdir holds one checkpoint directory per stage (`checkpoints/<stage>/<step>/`) and
`run.json`, the stages of its pipeline in order. Which stage to read is always explicit: the
caller names it, or it is the last stage of the pipeline that has a checkpoint (never the
directory that happens to be newest on disk).

Three kinds of checkpoint load into the same `LoadedRun`:
  float      params item = the whole model (pretrain, full fine-tuning, an HF import);
  quantized  params item = packed weights (`llmjax-quantize`), meta['quantization'];
  LoRA       params item = the adapters alone, meta['lora'] + meta['base'] naming the
             checkpoint they were trained on, which is loaded first (recursively).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from flax import nnx

from llmjax.checkpoint import Checkpointer, abstract_like
from llmjax.errors import CheckpointError
from llmjax.model import lora
from llmjax.model.config import ModelConfig

RUN_FILE = "run.json"


@dataclasses.dataclass
class LoadedRun:
  """A run's parameters with everything needed to use them.

  `params` is the model's whole state (a LoRA run's base and adapters together).
  """
  graphdef: Any
  params: Any
  model_cfg: ModelConfig
  tokenizer: Any
  stage: str
  step: int
  meta: dict[str, Any]

  @property
  def source(self) -> dict[str, Any]:
    """Where this checkpoint lives: what a stage trained on it records as its base."""
    return {"workdir": self.meta.get("workdir"), "stage": self.stage, "step": self.step}

  def float_params(self) -> nnx.State:
    """The parameters of the plain float model (`build_model(model_cfg)`): LoRA adapters
    merged into their weights, quantized weights dequantized."""
    return merged_params(self.graphdef, self.params)

  def float_model(self) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, params) of the plain float model; see `float_params`."""
    return float_model(self.graphdef, self.params, self.model_cfg)


def float_model(graphdef: nnx.GraphDef, params: nnx.State,
                cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """(graphdef, params) of `build_model(cfg)` computing what (graphdef, params) computes."""
  from llmjax.model.transformer import build_model
  plain = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))[0]
  return plain, merged_params(graphdef, params)


def merged_params(graphdef: nnx.GraphDef, params: nnx.State) -> nnx.State:
  """`params` as the state of a plain float `Transformer`: any LoRA adapters folded in, any
  quantized weights dequantized (`lora.merge_lora`). Returned unchanged when plain already."""
  from llmjax.model.quant import QuantizedWeight
  quantized = any(isinstance(v, QuantizedWeight) for v in jax.tree.leaves(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable)))
  if not lora.has_lora(params) and not quantized:
    return params

  @jax.jit
  def merge(p):
    return nnx.state(lora.merge_lora(nnx.merge(graphdef, p)))
  return merge(params)


def record_stages(workdir: str, stages: list[str]) -> None:
  """Adds `stages` (in pipeline order) to the workdir's run.json."""
  path = os.path.join(workdir, RUN_FILE)
  known = read_stages(workdir)
  merged = known + [s for s in stages if s not in known]
  os.makedirs(workdir, exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"stages": merged}, f, indent=2)
  os.replace(path + ".tmp", path)


def read_stages(workdir: str) -> list[str]:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return list(json.load(f).get("stages", []))


def saved_stages(workdir: str) -> list[str]:
  root = os.path.join(workdir, "checkpoints")
  return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))) \
      if os.path.isdir(root) else []


def has_checkpoint(workdir: str, stage: str) -> bool:
  """Whether `stage` of the run has saved a step (an empty directory is not a checkpoint)."""
  directory = os.path.join(workdir, "checkpoints", stage)
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def recorded_tokenizer(workdir: str, stage: str | None = None) -> str | None:
  """The tokenizer file (a name inside `workdir`) the run's checkpoints record in their meta:
  `stage`'s latest checkpoint first, then the other stages' (pipeline order). None when no
  checkpoint records one (a new run; an import saved without a tokenizer)."""
  saved = saved_stages(workdir)
  for name in dict.fromkeys(s for s in [stage, *read_stages(workdir), *saved] if s in saved):
    if not has_checkpoint(workdir, name):
      continue
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints", name), every=1, read_only=True)
    try:
      step = ckpt.latest_step()
      tokenizer = ckpt.read_meta(step).get("tokenizer") if step is not None else None
    finally:
      ckpt.close()
    if tokenizer:
      return tokenizer
  return None


def default_stage(workdir: str) -> str:
  """The last stage of the run's pipeline that has a checkpoint; with no pipeline record,
  the only stage there is (an import, a quantized model). Otherwise an error that lists them."""
  saved = saved_stages(workdir)
  if not saved:
    raise CheckpointError(f"no checkpoints under {os.path.join(workdir, 'checkpoints')}: "
                          f"train first (llmjax-train --workdir={workdir})")
  ordered = [s for s in read_stages(workdir) if s in saved]
  if ordered:
    return ordered[-1]
  if len(saved) == 1:
    return saved[0]
  raise CheckpointError(f"{workdir} holds the stages {saved} and no {RUN_FILE} says which "
                        "came last: name one (--stage=NAME, or 'workdir:stage' in gin)")


def checkpoint_head(workdir: str, stage: str, step: int | None = None) -> str:
  """The model head ('lm' or 'score') of a stage's checkpoint, from its metadata alone."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints", stage)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{workdir} has no checkpoint of stage {stage!r}; its stages: "
                          f"{saved_stages(workdir)}")
  ckpt = Checkpointer(directory, every=1, read_only=True)
  try:
    meta = ckpt.read_meta(ckpt.resolve_step(step))
  finally:
    ckpt.close()
  return ModelConfig.from_dict(meta["model"]).head


def stage_heads(workdir: str) -> dict[str, str]:
  """{stage: head of its latest checkpoint}, pipeline stages first; stages with no saved step
  are left out."""
  saved = saved_stages(workdir)
  ordered = [s for s in read_stages(workdir) if s in saved]
  heads = {}
  for stage in ordered + [s for s in saved if s not in ordered]:
    try:
      heads[stage] = checkpoint_head(workdir, stage)
    except CheckpointError:
      continue
  return heads


def load_run(workdir: str, stage: str | None = None, step: int | None = None,
             abstract_params: Any = None, kernel: str | None = None) -> LoadedRun:
  """Parameters, config and tokenizer of a run's (or an import's) checkpoint.

  Args:
    stage: default `default_stage(workdir)`; step: default the latest.
    abstract_params: ShapeDtypeStructs with shardings choosing where the arrays of a float
      checkpoint land; default one device.
    kernel: the int4 matmul of a quantized checkpoint ('pallas' or 'reference').
  """
  from llmjax.model.transformer import build_model

  workdir = os.path.abspath(workdir)
  stage = stage or default_stage(workdir)
  directory = os.path.join(workdir, "checkpoints", stage)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{workdir} has no checkpoint of stage {stage!r}; its stages: "
                          f"{saved_stages(workdir)}")
  ckpt = Checkpointer(directory, every=1, read_only=True)
  try:
    step = ckpt.resolve_step(step)
    meta = {**ckpt.read_meta(step), "workdir": workdir}
    cfg = ModelConfig.from_dict(meta["model"])
    if "quantization" in meta:
      from llmjax.runs.quantized import restore_quantized
      graphdef, params = restore_quantized(ckpt, step, meta, kernel)
    elif "lora" in meta:
      graphdef, params = _restore_lora(ckpt, step, meta, cfg)
    else:
      graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
      params = ckpt.restore_params(step, abstract_params or abstract_like(abstract))
  finally:
    ckpt.close()
  # An import of an HF model saved without a tokenizer records None.
  tok_file = meta.get("tokenizer", "tokenizer.model")
  tokenizer = _load_tokenizer(os.path.join(workdir, tok_file), cfg,
                              f"{directory}/{step}") if tok_file else None
  return LoadedRun(graphdef, params, cfg, tokenizer, stage, step, meta)


def _load_tokenizer(path: str, cfg: ModelConfig, where: str) -> Any:
  """The tokenizer a checkpoint records, which must still be there and fit its model."""
  from llmjax.data.hf_tokenizer import load_tokenizer
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} is missing: {where} was trained with it; copy it back "
                          "into the workdir")
  tokenizer = load_tokenizer(path)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise CheckpointError(f"{path} has {tokenizer.vocab_size} pieces but the model of {where} "
                          f"has vocab_size {cfg.vocab_size}: it is not the tokenizer that "
                          "model was trained with; put that one back")
  return tokenizer


def load_base(meta: dict[str, Any], where: str) -> LoadedRun:
  """The checkpoint a LoRA checkpoint's adapters were trained on (its meta['base'])."""
  base = meta.get("base") or {}
  if not base.get("workdir") or not os.path.isdir(os.path.join(base["workdir"],
                                                                "checkpoints")):
    raise CheckpointError(
        f"{where} holds LoRA adapters trained on {base or 'an unrecorded base'}, which cannot "
        "be found: restore that workdir at its recorded path")
  return load_run(base["workdir"], base["stage"], base["step"])


def _restore_lora(ckpt: Checkpointer, step: int, meta: dict[str, Any], cfg: ModelConfig):
  from llmjax.checkpoint import check_same_model
  from llmjax.train.roles import policy_role
  where = f"{ckpt.directory}/{step}"
  base = load_base(meta, where)
  init = base.float_params()
  body_cfg = cfg
  if cfg.head == "score" and base.model_cfg.head == "lm":
    # A LoRA reward model trained on a language model: the base body plus the saved head.
    from llmjax.model.reward import init_reward_model
    body_cfg = dataclasses.replace(cfg, head="lm", tie_embeddings=base.model_cfg.tie_embeddings)
    init = init_reward_model(init, cfg)
  check_same_model(dataclasses.asdict(base.model_cfg), body_cfg,
                   f"the base of {where} ({base.meta['workdir']}, stage {base.stage})")
  role = policy_role(cfg, init, lora.LoraConfig.from_dict(meta["lora"]))
  graphdef, abstract_adapters, _ = nnx.split(nnx.eval_shape(lambda: role.build(role.init)),
                                             role.trainable, ...)
  frozen = jax.jit(lambda i: nnx.split(role.build(i), role.trainable, ...)[2])(role.init)
  adapters = ckpt.restore_params(step, abstract_like(abstract_adapters))
  return graphdef, nnx.merge_state(adapters, frozen)
