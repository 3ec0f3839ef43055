"""PEFT LoRA adapter folders: export a LoRA run's adapters, read one for an import.

  export_adapter   a LoRA checkpoint -> adapter_config.json + adapter_model.safetensors
  load_adapter     a PEFT folder -> LoraConfig + our adapters, checked against the base

Names, layouts and the config mapping are in `llmjax.hf.peft`; both directions check every
tensor name and shape there before anything is written or kept, because peft drops a name
it does not know without a word.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any, Callable

import jax
import numpy as np
from absl import logging

from llmjax.errors import CheckpointError, ConfigError
from llmjax.hf import convert, peft
from llmjax.hf.export import (DTYPES, atomic_output_dir, fetch_to_host, write_json,
                              write_safetensors)
from llmjax.model import lora
from llmjax.model.config import ModelConfig

if TYPE_CHECKING:  # llmjax.runs.load is imported lazily, as in export.export_run
  from llmjax.runs.load import LoadedRun


def export_adapter(run: LoadedRun, output: str, dtype: str | None = None,
                   overwrite: bool = False) -> str:
  """Writes a LoRA run's adapters as a PEFT LoRA folder at `output`.

  `adapter_config.json` + `adapter_model.safetensors` (+ the run's tokenizer), loadable with
  `peft.PeftModel.from_pretrained(base, output)` where base is the HF model of the run's base
  checkpoint (`base_model_name_or_path`: the HF folder it was imported from, else its
  workdir, to export with llmjax-export). A QLoRA run's adapters were trained against the
  quantized base: on the float base the result differs by the quantization error.
  Every name and shape is checked against the base model before anything is written.
  """
  from flax import nnx
  where = f"{run.meta.get('workdir')} (stage {run.stage}, step {run.step})"
  if "lora" not in run.meta:
    raise ConfigError(f"{where} is not a LoRA checkpoint, so it has no adapters to export "
                      "alone: drop --adapter_only to export the full model")
  dtype = dtype or run.model_cfg.param_dtype
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  cfg, lora_cfg = run.model_cfg, lora.LoraConfig.from_dict(run.meta["lora"])
  specs = peft.adapter_specs(cfg, lora_cfg.target_modules)
  held = len(jax.tree.leaves(run.params.filter(nnx.LoRAParam)))
  if held != 2 * len(specs):
    raise CheckpointError(f"{where} holds {held} adapter tensors but its LoraConfig "
                          f"(target_modules {list(lora_cfg.target_modules)}) implies "
                          f"{2 * len(specs)}: refusing to drop any")
  tensors: dict[str, np.ndarray] = {}
  for spec in specs:  # every process: fetch_to_host may be a collective
    a, b = (fetch_to_host(convert.get_path(run.params, spec.path + (ab,))) for ab in "ab")
    tensors.update({k: v.astype(np_dtype) for k, v in peft.to_peft(spec, a, b).items()})
  peft.check_adapter_tensors({k: v.shape for k, v in tensors.items()}, cfg, lora_cfg, where)
  if jax.process_index() != 0:
    return os.path.abspath(output)
  if lora_cfg.quantize_base is not None:
    logging.warning("%s is QLoRA: its adapters were trained on the %s-quantized base; "
                    "applied to the float base they give a slightly different model (the "
                    "merged export is exact)", where, lora_cfg.quantize_base.scheme)
  with atomic_output_dir(output, overwrite) as tmp:
    write_json(os.path.join(tmp, peft.CONFIG_FILE),
               peft.adapter_config(lora_cfg, _base_model_name(run.meta)))
    # peft reads one adapter_model.safetensors, never shards: no size limit.
    files = write_safetensors(tensors.items(), tmp, max_shard_size=2**62,
                              prefix="adapter_model")
    if run.tokenizer is not None:
      from llmjax.hf.tokenizer_files import write_tokenizer_files
      files += write_tokenizer_files(run.tokenizer, tmp, run.meta.get("chat_template"),
                                     cfg.max_seq_len)
  logging.info("Exported the LoRA adapters of %s to %s: %s", where, output, files)
  return os.path.abspath(output)


def _base_model_name(meta: dict[str, Any]) -> str:
  """The HF folder the adapters' base checkpoint was imported from, else its workdir."""
  from llmjax.checkpoint import Checkpointer
  base = meta["base"]
  ckpt = Checkpointer(os.path.join(base["workdir"], "checkpoints", base["stage"]), every=1,
                      read_only=True)
  try:
    base_meta = ckpt.read_meta(base["step"])
  finally:
    ckpt.close()
  if "lora" in base_meta:
    logging.warning("The base of these adapters is itself a LoRA checkpoint (%s): load them "
                    "onto its merged export (llmjax-export --workdir=%s --stage=%s)",
                    base, base["workdir"], base["stage"])
  source = base_meta.get("source")
  return source if isinstance(source, str) else base["workdir"]


def read_adapter_config(peft_dir: str) -> dict[str, Any]:
  """adapter_config.json of a PEFT folder, once its adapter_model.safetensors is known to be
  there (a pickled adapter_model.bin is refused: llmjax never unpickles)."""
  config_path = os.path.join(peft_dir, peft.CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise CheckpointError(f"{config_path} not found: --peft must be a PEFT adapter folder (as "
                          "written by PeftModel.save_pretrained)")
  if not os.path.isfile(os.path.join(peft_dir, peft.WEIGHTS_FILE)):
    pickled = os.path.isfile(os.path.join(peft_dir, "adapter_model.bin"))
    raise CheckpointError(
        f"{os.path.join(peft_dir, peft.WEIGHTS_FILE)} not found" + (
            ": the folder holds only the pickled adapter_model.bin, which llmjax never loads "
            "(unpickling can run code); re-save it with save_pretrained(dir, "
            "safe_serialization=True)" if pickled else ""))
  try:
    with open(config_path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{config_path}: not valid JSON ({e})") from None


def load_adapter(peft_dir: str, cfg: ModelConfig, base_tensor: Callable[[str], np.ndarray]
                 ) -> tuple[lora.LoraConfig, dict[tuple[Any, ...], tuple[np.ndarray, ...]]]:
  """(LoraConfig, {adapter path: (a, b) in our layout}) of a PEFT folder for `cfg`'s model.

  `base_tensor(hf_name)` reads a tensor of the base HF folder: peft saves its own copy of
  lm_head (`...lm_head.base_layer.weight`) when lm_head is targeted, and loads it over the
  base's, so such a copy must equal the base's. Every name and shape is checked first.
  """
  from safetensors import SafetensorError, safe_open
  lora_cfg = peft.lora_config_from_peft(read_adapter_config(peft_dir), cfg,
                                        os.path.join(peft_dir, peft.CONFIG_FILE))
  where = os.path.join(peft_dir, peft.WEIGHTS_FILE)
  base_names = set(convert.hf_tensor_names(cfg))
  try:
    with safe_open(where, framework="numpy") as handle:
      adapter_names = []
      for name in handle.keys():
        dtype = handle.get_slice(name).get_dtype()
        if dtype not in ("F64", "F32", "F16", "BF16"):
          raise CheckpointError(f"{where}: tensor {name} has dtype {dtype}; only "
                                "floating-point adapters can be imported")
        base_name = name.removeprefix(peft.PREFIX).replace(".base_layer.weight", ".weight")
        if name.startswith(peft.PREFIX) and base_name in base_names:
          _check_base_copy(where, name, handle.get_tensor(name), base_name,
                           base_tensor(base_name))
        else:
          adapter_names.append(name)
      shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in adapter_names}
      peft.check_adapter_tensors(shapes, cfg, lora_cfg, where)
      tensors = {n: handle.get_tensor(n) for n in adapter_names}
  except SafetensorError as e:  # a truncated or corrupt file
    raise CheckpointError(f"{where}: unreadable safetensors file ({e})") from None
  return lora_cfg, {spec.path: peft.from_peft(spec, tensors)
                    for spec in peft.adapter_specs(cfg, lora_cfg.target_modules)}


def _check_base_copy(where: str, name: str, copy: np.ndarray, base_name: str,
                     base: np.ndarray) -> None:
  """peft loads a saved copy of a base weight over the base's: it must be the same."""
  if copy.shape != base.shape or not np.array_equal(copy.astype(np.float32),
                                                    base.astype(np.float32)):
    raise CheckpointError(
        f"{where}: tensor {name} is a copy of the base's {base_name} that differs from the "
        f"--hf model's (shape {list(copy.shape)} vs {list(base.shape)}, or values): the "
        "adapter was trained on another base, or with a resized vocabulary, which llmjax "
        "cannot import")
