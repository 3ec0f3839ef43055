"""Reads a Hugging Face Llama/Qwen2/Mixtral/Qwen2-MoE folder into an llmjax workdir.

The output is a workdir holding one checkpoint, `<out>/checkpoints/import/0/` (items `params`
and `meta`), plus the tokenizer, so `load_run(out)`, `llmjax-generate --workdir=out`,
`llmjax-export --workdir=out` and gin's `pretrain.init_from = 'out'` all take it as a run.

With a PEFT LoRA folder (`peft_dir`), the workdir gets a second stage, `peft`: a LoRA
checkpoint of the adapters whose base is `import`, listed after it in run.json, so the run's
default model is the adapted one. Adapter names, shapes and config are checked against the
base before anything is written (`llmjax.hf.adapters`).

Only safetensors are read: pickle-based `.bin`/`.pt`/`.pth` files can run arbitrary code when
loaded, so folders holding only those are refused with instructions to convert them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from absl import logging

from llmjax.errors import CheckpointError, ConfigError, DataError
from llmjax.hf import convert
from llmjax.hf.export import DTYPES, atomic_output_dir
from llmjax.model.config import ModelConfig

STAGE = "import"
PEFT_STAGE = "peft"  # the LoRA stage of `--peft`, on top of STAGE
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_TOKENIZER_AUX = ("tokenizer_config.json", "special_tokens_map.json")


def read_hf_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} not found: --hf must be a Hugging Face model folder (as "
                          "written by save_pretrained or downloaded from the Hub)")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _open_safetensors(path: str) -> Any:
  from safetensors import safe_open
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:  # safetensors raises SafetensorError for a truncated header
    raise CheckpointError(f"{path}: unreadable safetensors file ({e}); download it "
                          "again") from None


class SafetensorsFolder:
  """The tensors of `model.safetensors` or of the shards listed in its index, read lazily."""

  def __init__(self, hf_dir: str):
    self.dir = hf_dir
    single = os.path.join(hf_dir, "model.safetensors")
    index = single + ".index.json"
    self._open: dict[str, Any] = {}
    if os.path.isfile(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: not a safetensors index ({e!r}); re-save the model "
                              "with save_pretrained") from None
      missing = sorted({s for s in weight_map.values()
                        if not os.path.isfile(os.path.join(hf_dir, s))})
      if missing:
        raise CheckpointError(f"{index} lists shard(s) {missing} that are missing from "
                              f"{hf_dir}: download them again")
      self.files = {name: os.path.join(hf_dir, s) for name, s in weight_map.items()}
    elif os.path.isfile(single):
      self._open = {single: _open_safetensors(single)}
      self.files = {name: single for name in self._open[single].keys()}
    else:
      self._refuse(hf_dir)

  @staticmethod
  def _refuse(hf_dir: str) -> None:
    pickled = sorted(f for f in os.listdir(hf_dir) if f.endswith(_PICKLE_SUFFIXES))
    if pickled:
      raise CheckpointError(
          f"{hf_dir} holds only pickle weights ({', '.join(pickled[:3])}), which llmjax never "
          "loads because unpickling can run arbitrary code. Convert them in transformers: "
          "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir, "
          "safe_serialization=True), then import new_dir")
    raise CheckpointError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")

  def _handle(self, path: str):
    if path not in self._open:
      self._open[path] = _open_safetensors(path)
    return self._open[path]

  def names(self) -> list[str]:
    return list(self.files)

  def get(self, name: str) -> np.ndarray:
    """One tensor; CheckpointError naming it if absent or not floating point."""
    if name not in self.files:
      raise CheckpointError(f"tensor {name} is missing from {self.dir}: the weights do not "
                            "match config.json")
    handle = self._handle(self.files[name])
    if name not in handle.keys():
      raise CheckpointError(f"tensor {name} is listed in the index but missing from "
                            f"{self.files[name]}: download it again")
    dtype = handle.get_slice(name).get_dtype()
    if dtype not in _FLOAT_DTYPES:
      raise CheckpointError(f"tensor {name} has dtype {dtype}; only floating-point weights "
                            f"({', '.join(_FLOAT_DTYPES)}) can be imported: dequantize the "
                            "model first")
    return handle.get_tensor(name)

  def close(self) -> None:
    self._open.clear()


def load_hf_params(hf_dir: str, dtype: str = "float32") -> tuple[ModelConfig, Any, Any]:
  """(config, graphdef, params as nnx.State) of an HF folder, params cast to `dtype`."""
  from flax import nnx
  from llmjax.model.transformer import build_model
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
  try:
    cfg = convert.config_from_hf(read_hf_config(hf_dir), dtype)
  except ConfigError as e:
    raise ConfigError(f"{hf_dir}: {e}") from None
  weights = SafetensorsFolder(hf_dir)
  specs: dict[tuple[Any, ...], list[convert.TensorSpec]] = {}
  for spec in convert.tensor_specs(cfg):  # a stacked expert parameter has one per expert
    specs.setdefault(spec.path, []).append(spec)
  expected = {s.hf_name for group in specs.values() for s in group}
  extra = sorted(n for n in weights.names()
                 if n not in expected and not convert.is_ignorable(n, cfg))
  if extra:
    fused = any(n.endswith(".experts.gate_up_proj") for n in extra)
    raise CheckpointError(
        f"tensor(s) {extra[:5]} in {hf_dir} have no place in the llmjax model of its "
        "config.json (unsupported extra weights); refusing to drop them" + (
            ". They are transformers 5's fused in-memory expert layout: load the folder in "
            "transformers and save_pretrained it, which writes the per-expert tensors"
            if fused else ""))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg)))
  np_dtype = np.dtype(jax.numpy.dtype(dtype))

  def fill(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    keys = keys[:-1] if keys[-1] == "value" else keys
    # One parameter at a time: read, transpose, cast, put on device, drop the host copy.
    # Expert specs come in expert order: their slices stack into `[E, ...]`.
    slices = [convert.from_hf(s, weights.get(s.hf_name)).astype(np_dtype) for s in specs[keys]]
    return jax.device_put(slices[0] if specs[keys][0].expert is None else np.stack(slices))

  try:
    params = jax.tree_util.tree_map_with_path(fill, abstract)
  finally:
    weights.close()
  return cfg, graphdef, params


def read_chat_template(hf_dir: str) -> str | None:
  """The chat template of a folder's tokenizer_config.json or chat_template.jinja, if any."""
  config_path = os.path.join(hf_dir, "tokenizer_config.json")
  if os.path.isfile(config_path):
    with open(config_path, encoding="utf-8") as f:
      chat_template = json.load(f).get("chat_template")
    if chat_template is not None:
      return chat_template
  jinja = os.path.join(hf_dir, "chat_template.jinja")  # transformers >=4.43 writes it apart
  if os.path.isfile(jinja):
    with open(jinja, encoding="utf-8") as f:
      return f.read()
  return None


def _import_tokenizer(hf_dir: str, out_dir: str) -> tuple[str | None, str | None]:
  """Copies the tokenizer into `out_dir`: (file name for meta, chat template or None)."""
  chat_template = read_chat_template(hf_dir)
  for aux in _TOKENIZER_AUX:
    if os.path.isfile(os.path.join(hf_dir, aux)):
      shutil.copy(os.path.join(hf_dir, aux), os.path.join(out_dir, aux))
  for name in ("tokenizer.model", "tokenizer.json"):
    if os.path.isfile(os.path.join(hf_dir, name)):
      shutil.copy(os.path.join(hf_dir, name), os.path.join(out_dir, name))
      return name, chat_template
  logging.warning("%s has no tokenizer.model or tokenizer.json: the import has no tokenizer; "
                  "give the run one with TokenizerConfig.path", hf_dir)
  return None, chat_template


def import_hf(hf_dir: str, output: str, dtype: str = "float32", overwrite: bool = False,
              peft_dir: str | None = None) -> str:
  """Imports `hf_dir` as an llmjax workdir at `output` (written atomically); returns it.

  With `peft_dir` (a PEFT LoRA folder trained on `hf_dir`'s model) the adapters become a
  second stage, `peft`, whose LoRA checkpoint names `import` as its base; run.json lists
  both, so `load_run(output)` gives the adapted model. The adapter is checked against the
  base (names, shapes, config) before anything is written.
  """
  from llmjax.checkpoint import Checkpointer
  from llmjax.data.hf_tokenizer import load_tokenizer
  from llmjax.data.tokenizer import check_fits_model
  hf_dir = os.path.abspath(hf_dir)
  if not os.path.isdir(hf_dir):
    raise CheckpointError(f"--hf={hf_dir} is not a folder")
  cfg, _, params = load_hf_params(hf_dir, dtype)
  hf_cfg = read_hf_config(hf_dir)
  adapter = _read_adapter(os.path.abspath(peft_dir), hf_dir, cfg) if peft_dir else None
  with atomic_output_dir(output, overwrite) as tmp:
    tok_file, chat_template = _import_tokenizer(hf_dir, tmp)
    if tok_file:
      try:
        check_fits_model(load_tokenizer(os.path.join(tmp, tok_file)), cfg.vocab_size)
      except (ConfigError, DataError) as e:
        raise DataError(f"{hf_dir}: tokenizer does not fit the model: {e}") from None
    meta = {"model": dataclasses.asdict(cfg), "stage": STAGE, "step": 0,
            "tokenizer": tok_file, "source": hf_dir,
            "hf_architecture": hf_cfg["architectures"][0]}
    if chat_template:
      meta["chat_template"] = chat_template
    _save(Checkpointer(os.path.join(tmp, "checkpoints", STAGE), every=1, async_save=False),
          params, meta)
    if adapter is not None:
      _save_adapter(tmp, os.path.abspath(output), cfg, meta, *adapter)
  logging.info("Imported %s (%s) to %s%s", hf_dir, meta["hf_architecture"], output,
               f" with the LoRA adapter {peft_dir} as stage {PEFT_STAGE}" if adapter else "")
  return os.path.abspath(output)


def _save(ckpt: Any, params: Any, meta: dict[str, Any]) -> None:
  """One synchronous params-only save at step 0, closing the Checkpointer either way."""
  try:
    ckpt.save_params_only(0, params, meta)
    ckpt.wait()
  finally:
    ckpt.close()


def _read_adapter(peft_dir: str, hf_dir: str, cfg: ModelConfig
                  ) -> tuple[Any, dict[tuple[Any, ...], tuple[np.ndarray, ...]], str, str | None]:
  """(LoraConfig, {path: (a, b)}, peft_dir, chat template) of a PEFT folder, all checked."""
  from llmjax.hf.adapters import load_adapter
  if not os.path.isdir(peft_dir):
    raise CheckpointError(f"--peft={peft_dir} is not a folder")
  base = SafetensorsFolder(hf_dir)
  try:
    lora_cfg, adapters = load_adapter(peft_dir, cfg, base.get)
  finally:
    base.close()
  return lora_cfg, adapters, peft_dir, read_chat_template(peft_dir)


def _save_adapter(tmp: str, output: str, cfg: ModelConfig, base_meta: dict[str, Any],
                  lora_cfg: Any, adapters: dict[tuple[Any, ...], tuple[np.ndarray, ...]],
                  peft_dir: str, chat_template: str | None) -> None:
  """Writes the `peft` stage: the adapters alone, on the `import` stage of `output`."""
  from flax import nnx
  from llmjax.checkpoint import Checkpointer
  from llmjax.model import lora
  from llmjax.model.transformer import build_model
  from llmjax.runs.load import record_stages
  abstract = nnx.split(nnx.eval_shape(lambda: lora.add_lora(build_model(cfg), lora_cfg)),
                       nnx.LoRAParam, ...)[1]
  np_dtype = np.dtype(jax.numpy.dtype(cfg.param_dtype))

  def fill(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)
    keys = keys[:-1] if keys[-1] == "value" else keys
    return jax.device_put(adapters[keys[:-1]]["ab".index(keys[-1])].astype(np_dtype))

  meta = {"model": dataclasses.asdict(cfg), "stage": PEFT_STAGE, "step": 0,
          "tokenizer": base_meta["tokenizer"], "source": peft_dir,
          "lora": lora_cfg.to_dict(), "base": {"workdir": output, "stage": STAGE, "step": 0}}
  chat_template = chat_template or base_meta.get("chat_template")
  if chat_template:
    meta["chat_template"] = chat_template
  _save(Checkpointer(os.path.join(tmp, "checkpoints", PEFT_STAGE), every=1, async_save=False),
        jax.tree_util.tree_map_with_path(fill, abstract), meta)
  record_stages(tmp, [STAGE, PEFT_STAGE])
