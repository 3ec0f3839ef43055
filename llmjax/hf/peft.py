"""PEFT LoRA adapters <-> llmjax LoRA adapters: tensor names, layouts and the config.

A PEFT LoRA folder is `adapter_config.json` + `adapter_model.safetensors`. For each adapted
base Linear, e.g. `model.layers.{i}.self_attn.q_proj` (HF weight `[out, in]`), it holds

  base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight   [r, in]
  base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight   [out, r]

and peft computes `W x + s * B A x` with s = lora_alpha / r (lora_alpha / sqrt(r) with
rsLoRA): our `x W + s * x A B` transposed. Ours are a `[*d_in, r]`, b `[r, *d_out]` with heads
as separate axes, flattened in the order `convert` flattens the weight, so
lora_A = a.reshape(d_in, r).T and lora_B = b.reshape(r, d_out).T.

peft loads these tensors with `load_state_dict(strict=False)`: a name that matches no module
is dropped without a word and the adapter it was meant for keeps B = 0. So every name is
checked against the base model's Linear weights (`convert.tensor_specs`) and every
targeted module must have both tensors, on export before anything is written and on import
before anything is kept.

Pure mapping, like `convert`: no file I/O (that is `llmjax.hf.adapters`), and nothing here
imports peft or torch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import numpy as np

from llmjax.errors import CheckpointError, ConfigError
from llmjax.hf import convert
from llmjax.model import lora, weights
from llmjax.model.config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
_LINEAR_KINDS = ("linear", "in_heads", "out_heads")  # convert's kinds of nn.Linear weights
# adapter_config.json keys that do not change what the adapted model computes.
_INERT_KEYS = {"peft_version", "auto_mapping", "base_model_name_or_path", "revision",
               "inference_mode", "layers_pattern", "megatron_core", "qalora_group_size",
               "runtime_config", "ensure_weight_tying", "eva_config", "lora_ga_config",
               "corda_config", "loftq_config", "task_type", "peft_type", "init_lora_weights"}
# Initializations that only set A and B; the others (pissa, olora, loftq, corda, lora_ga,
# ...) rewrite the base weights when peft loads the adapter, so base + delta is not the model.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """One adapted Linear: its PEFT module name and our adapter's place and shapes.

  Attributes:
    module: the HF module, e.g. 'model.layers.0.self_attn.q_proj'.
    target: its target_modules name ('q_proj').
    path: our adapter module's path in the state, e.g. ('layers', 0, 'attn', 'q_proj_lora').
    in_shape, out_shape: our d_in and d_out axes (q_proj: (d,), (n_heads, head_dim)).
  """
  module: str
  target: str
  path: tuple[Any, ...]
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]

  @property
  def names(self) -> tuple[str, str]:
    """(lora_A, lora_B) tensor names in adapter_model.safetensors."""
    return (f"{PREFIX}{self.module}.lora_A.weight", f"{PREFIX}{self.module}.lora_B.weight")

  def hf_shapes(self, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return (r, math.prod(self.in_shape)), (math.prod(self.out_shape), r)


def adapter_specs(cfg: ModelConfig, target_modules: tuple[str, ...] | list[str]
                  ) -> list[AdapterSpec]:
  """The adapted Linears of `cfg`'s model for `target_modules`, in checkpoint order."""
  out = []
  for spec in convert.tensor_specs(cfg):
    target = spec.path[-1]
    if spec.kind in _LINEAR_KINDS and spec.expert is None and target in target_modules:
      n_in = weights.LAYOUTS[target].n_in
      out.append(AdapterSpec(spec.hf_name.removesuffix(".weight"), target,
                             spec.path[:-1] + (target + "_lora",), spec.shape[:n_in],
                             spec.shape[n_in:]))
  return out


def loadable_names(cfg: ModelConfig) -> set[str]:
  """Every adapter tensor name peft would load onto `cfg`'s HF model.

  Built from the HF names of the base's Linear weights alone, independently of
  `AdapterSpec.names`, so a wrong name from that mapping is caught rather than silently
  ignored by peft.
  """
  return {f"{PREFIX}{s.hf_name.removesuffix('.weight')}.lora_{ab}.weight"
          for s in convert.tensor_specs(cfg) if s.kind in _LINEAR_KINDS and s.expert is None
          for ab in "AB"}


def check_adapter_tensors(tensors: Mapping[str, tuple[int, ...]], cfg: ModelConfig,
                          lora_cfg: lora.LoraConfig, where: str) -> None:
  """CheckpointError unless `tensors` (name -> shape) is exactly the adapter of `lora_cfg`
  on `cfg`'s model: every name loadable by peft and targeted, none missing, shapes right."""
  loadable = loadable_names(cfg)
  stray = sorted(n for n in tensors if n not in loadable)
  if stray:
    raise CheckpointError(
        f"{where}: adapter tensor(s) {stray[:4]} name no Linear weight of the base model "
        f"(expected names like {max(loadable)}); peft would silently ignore them")
  specs = adapter_specs(cfg, lora_cfg.target_modules)
  untargeted = sorted(set(tensors) - {n for spec in specs for n in spec.names})
  if untargeted:
    raise CheckpointError(
        f"{where}: tensor(s) {untargeted[:4]} adapt modules that target_modules "
        f"{list(lora_cfg.target_modules)} does not name; peft would not load them")
  for spec in specs:
    for name, shape in zip(spec.names, spec.hf_shapes(lora_cfg.rank)):
      if name not in tensors:
        raise CheckpointError(f"{where}: tensor {name} is missing, but target_modules names "
                              f"{spec.target}: the adapter is incomplete")
      if tuple(tensors[name]) != shape:
        raise CheckpointError(
            f"{where}: tensor {name} has shape {list(tensors[name])}, expected {list(shape)} "
            f"(r={lora_cfg.rank} on the base's {spec.module}): the adapter was trained on a "
            "different base model or rank")


def to_peft(spec: AdapterSpec, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
  """Our a `[*d_in, r]`, b `[r, *d_out]` -> {lora_A name: `[r, in]`, lora_B name: `[out, r]`}."""
  r = a.shape[-1]
  name_a, name_b = spec.names
  return {name_a: np.ascontiguousarray(a.reshape(-1, r).T),
          name_b: np.ascontiguousarray(b.reshape(r, -1).T)}


def from_peft(spec: AdapterSpec, tensors: Mapping[str, np.ndarray]
              ) -> tuple[np.ndarray, np.ndarray]:
  """The inverse of `to_peft` (shapes already checked by `check_adapter_tensors`)."""
  name_a, name_b = spec.names
  a, b = tensors[name_a], tensors[name_b]
  r = a.shape[0]
  return (np.ascontiguousarray(a.T).reshape(*spec.in_shape, r),
          np.ascontiguousarray(b.T).reshape(r, *spec.out_shape))


# ---- adapter_config.json -------------------------------------------------------------------


def adapter_config(lora_cfg: lora.LoraConfig, base_model: str) -> dict[str, Any]:
  """adapter_config.json of `lora_cfg`: the fields peft has read since 0.9 (newer versions
  fill the rest with their defaults, older ones reject keys they do not know)."""
  return {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
      "revision": None, "inference_mode": True, "r": lora_cfg.rank,
      # peft types lora_alpha as int; write 16, not 16.0, when it is one
      "lora_alpha": int(lora_cfg.alpha) if float(lora_cfg.alpha).is_integer() else lora_cfg.alpha,
      "lora_dropout": lora_cfg.dropout,
      "target_modules": list(lora_cfg.target_modules), "use_rslora": lora_cfg.use_rslora,
      "use_dora": False, "bias": "none", "fan_in_fan_out": False, "modules_to_save": None,
      "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {},
  }


def lora_config_from_peft(hf: Mapping[str, Any], cfg: ModelConfig,
                          where: str) -> lora.LoraConfig:
  """The LoraConfig of a PEFT adapter_config.json dict, or a ConfigError for any feature
  whose adapted model is not `W + s * B A` on every layer of the named modules."""
  def refuse(why: str):
    raise ConfigError(f"{where}: {why}; llmjax imports plain LoRA adapters only")

  if hf.get("peft_type") != "LORA":
    refuse(f"peft_type is {hf.get('peft_type')!r}, not 'LORA'")
  if hf.get("task_type") not in (None, "CAUSAL_LM"):
    refuse(f"task_type is {hf['task_type']!r}, not 'CAUSAL_LM'")
  if hf.get("use_dora"):
    refuse("use_dora is true (DoRA rescales the weight by a learned magnitude)")
  if hf.get("bias", "none") != "none":
    refuse(f"bias is {hf['bias']!r}: trained biases are not part of an llmjax adapter; "
           "bias must be 'none'")
  if hf.get("fan_in_fan_out"):
    refuse("fan_in_fan_out is true (GPT-2 Conv1D layout), not a Llama/Qwen2 Linear")
  if hf.get("init_lora_weights", True) not in _PLAIN_INITS:
    refuse(f"init_lora_weights is {hf['init_lora_weights']!r}, which makes peft rewrite the "
           "base weights when it loads the adapter; convert it to a plain LoRA first "
           "(peft's path_initial_model_for_weight_conversion)")
  for key in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_to_transform"):
    if hf.get(key):
      refuse(f"{key} is {hf[key]!r} (must be empty: every targeted module on every layer, "
             "one rank and alpha)")
  handled = {"r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "use_dora",
             "bias", "fan_in_fan_out", "modules_to_save", "rank_pattern", "alpha_pattern",
             "layers_to_transform"}
  others = sorted(k for k, v in hf.items()
                  if k not in handled | _INERT_KEYS and v not in (None, False, {}, [], ""))
  if others:
    refuse(f"it sets {', '.join(f'{k}={hf[k]!r}' for k in others)}")
  targets = hf.get("target_modules")
  if not isinstance(targets, list) or not targets:
    refuse(f"target_modules is {targets!r}; only a list of module names is supported "
           f"(any of {', '.join(lora.TARGET_MODULES)}), not a regex or 'all-linear'")
  unknown = [t for t in targets if t not in lora.TARGET_MODULES]
  if unknown:
    refuse(f"target_modules names {unknown}, which are not Linear modules of a Llama/Qwen2 "
           f"model; supported: {', '.join(lora.TARGET_MODULES)}")
  if "lm_head" in targets and cfg.tie_embeddings:
    refuse("target_modules names lm_head, but the base ties it to embed_tokens "
           "(tie_word_embeddings)")
  try:
    return lora.LoraConfig(rank=int(hf["r"]), alpha=float(hf["lora_alpha"]),
                           dropout=float(hf.get("lora_dropout") or 0.0),
                           # peft saves a set: its order means nothing
                           target_modules=tuple(t for t in lora.TARGET_MODULES if t in targets),
                           use_rslora=bool(hf.get("use_rslora", False)))
  except KeyError as e:
    raise ConfigError(f"{where} lacks required field {e.args[0]!r}") from None
  except ConfigError as e:
    raise ConfigError(f"{where}: {e}") from None
