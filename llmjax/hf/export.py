"""Writes an llmjax checkpoint as a Hugging Face model folder.

  config.json, generation_config.json (language models only)
  model.safetensors, or model-0000k-of-0000n.safetensors + model.safetensors.index.json
  tokenizer.model (SentencePiece runs), tokenizer.json, tokenizer_config.json,
  special_tokens_map.json

A LoRA/QLoRA run exports merged (`W + s * A B`; a QLoRA base is dequantized from NF4/int4
first), which is exactly the model the run trained; `llmjax.hf.adapters` writes the adapters
alone as a PEFT folder instead. A reward model (head 'score') exports as
LlamaForSequenceClassification / Qwen2ForSequenceClassification with num_labels=1. A mixture
of experts exports as MixtralForCausalLM or Qwen2MoeForCausalLM (`convert.architecture_for`),
one tensor per expert as on the Hub.

Everything is written into a temporary folder beside the output and renamed into place once
complete, so a failed or killed export never leaves a folder that looks usable (what a killed
one leaves beside it, the next export to that output removes). Tensors are fetched and
converted one at a time and shards written as they fill, so host memory holds at most one
shard, never a second copy of the model.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from typing import Any, Iterable

import jax
import numpy as np
from absl import logging

from llmjax.errors import CheckpointError, ConfigError
from llmjax.hf import convert
from llmjax.model.config import ModelConfig

DTYPES = ("float32", "bfloat16")
# export_run's `task`: which head the exported model must have.
TASKS = {"causal_lm": "lm", "reward": "score"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
  """Bytes of '2GB' (decimal, as transformers), '500MiB' (binary), or a plain integer."""
  if isinstance(size, int):
    n = size
  else:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", size.upper())
    if not match:
      raise ConfigError(f"max_shard_size={size!r} is not a size: write e.g. 2GB, 500MB, "
                        "1GiB or a number of bytes")
    n = int(float(match.group(1)) * _UNITS[match.group(2)])
  if n <= 0:
    raise ConfigError(f"max_shard_size must be positive, got {size!r}")
  return n


def fetch_to_host(x: Any) -> np.ndarray:
  """One parameter as a host numpy array.

  A `jax.Array` sharded across hosts is not fully addressable by one process; it is gathered
  with `process_allgather`, a collective, so every process must export (each calls this for the
  same tensors in the same order) and only process 0 writes. Fully addressable arrays (one
  host, however many devices) come over with a plain `device_get`.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def write_safetensors(tensors: Iterable[tuple[str, np.ndarray]], directory: str,
                      max_shard_size: int | str = "2GB", prefix: str = "model",
                      metadata: dict[str, str] | None = None) -> list[str]:
  """Writes `(name, array)` pairs into `<prefix>.safetensors` or shards plus an index.

  Consumes the iterator lazily: a shard is written as soon as the next tensor would push it
  over `max_shard_size` (a tensor bigger than that gets a shard of its own). Returns the file
  names written. `prefix='adapter_model'` gives PEFT's file name.
  """
  from safetensors.numpy import save_file
  limit = parse_size(max_shard_size)
  meta = {"format": "pt", **(metadata or {})}
  shards: list[list[str]] = []
  pending: dict[str, np.ndarray] = {}
  pending_bytes, total = 0, 0

  def flush():
    nonlocal pending, pending_bytes
    if pending:
      # Shard count is unknown until the iterator ends: temporary names, renamed below.
      save_file(pending, os.path.join(directory, f".shard-{len(shards)}.tmp"), metadata=meta)
      shards.append(list(pending))
      pending, pending_bytes = {}, 0

  for name, array in tensors:
    if name in pending or any(name in s for s in shards):
      raise CheckpointError(f"tensor {name} produced twice by the exporter")
    if pending and pending_bytes + array.nbytes > limit:
      flush()
    pending[name] = array
    pending_bytes += array.nbytes
    total += array.nbytes
  flush()
  if not shards:
    raise CheckpointError("no tensors to export")
  if len(shards) == 1:
    names = [f"{prefix}.safetensors"]
  else:
    names = [f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  for i, name in enumerate(names):
    os.replace(os.path.join(directory, f".shard-{i}.tmp"), os.path.join(directory, name))
  if len(shards) > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {t: names[i] for i, s in enumerate(shards) for t in s}}
    with open(os.path.join(directory, f"{prefix}.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
    names.append(f"{prefix}.safetensors.index.json")
  return names


def write_json(path: str, obj: Any) -> None:
  """Indented JSON; non-ASCII (tokens, chat templates) is written as UTF-8, not escaped."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, ensure_ascii=False)
    f.write("\n")


def _special_id(tokenizer: Any, name: str) -> int | None:
  if tokenizer is None:
    return None
  i = getattr(tokenizer, name)
  return i if i is not None and i >= 0 else None


def atomic_output_dir(output: str, overwrite: bool = False):
  """Context manager: a temporary folder beside `output`, renamed to it on success.

  A process killed before the rename (SIGKILL, a lost VM) leaves its temporary folder
  behind, never a folder at `output`; the next export to the same `output` from this host
  deletes such leftovers (their process is gone), so a retried export of a large model does
  not pile up copies of it.
  """
  return _AtomicDir(output, overwrite)


def _temporary_prefixes(output: str) -> tuple[str, str]:
  """Name prefixes of this process's temporaries for `output`: its own folder being
  written, and the replaced one moved aside (`--overwrite`). Host and pid name the owner."""
  owner = f"{socket.gethostname()}-{os.getpid()}-"
  name = os.path.basename(output)
  return f".{name}.tmp-{owner}", f".{name}.old-{owner}"


def _remove_abandoned_temporaries(output: str) -> None:
  """Deletes what exports to `output` killed on this host left: temporaries whose process
  is no longer running (another process's live export is left alone)."""
  parent, name = os.path.split(output)
  host = socket.gethostname()
  pattern = re.compile(rf"\.{re.escape(name)}\.(tmp|old)-{re.escape(host)}-(\d+)-")
  for entry in os.listdir(parent):
    match = pattern.match(entry)
    if match and not _running(int(match.group(2))):
      logging.info("Removing %s, left by an export that did not finish",
                   os.path.join(parent, entry))
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


class _AtomicDir:

  def __init__(self, output: str, overwrite: bool):
    self.output = os.path.abspath(output)
    self.overwrite = overwrite
    self.tmp = None

  def __enter__(self) -> str:
    if os.path.exists(self.output) and not (
        os.path.isdir(self.output) and not os.listdir(self.output)) and not self.overwrite:
      raise ConfigError(f"{self.output} already exists: choose another --output or pass "
                        "--overwrite")
    parent = os.path.dirname(self.output)
    os.makedirs(parent, exist_ok=True)
    _remove_abandoned_temporaries(self.output)
    self.tmp = tempfile.mkdtemp(dir=parent, prefix=_temporary_prefixes(self.output)[0])
    return self.tmp

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      shutil.rmtree(self.tmp, ignore_errors=True)
      return
    # mkdtemp and safetensors make folder and weights owner-only; an export is to be shared.
    os.chmod(self.tmp, 0o755)
    for name in os.listdir(self.tmp):
      os.chmod(os.path.join(self.tmp, name), 0o644)
    old = None
    if os.path.exists(self.output):
      if os.path.isdir(self.output) and not os.listdir(self.output):
        os.rmdir(self.output)
      else:  # --overwrite: move the old one aside first so the swap is two renames
        old = tempfile.mkdtemp(dir=os.path.dirname(self.output),
                               prefix=_temporary_prefixes(self.output)[1])
        os.replace(self.output, os.path.join(old, "x"))
    os.replace(self.tmp, self.output)
    if old:
      shutil.rmtree(old, ignore_errors=True)


def export_params(params: Any, cfg: ModelConfig, output: str, *, tokenizer: Any = None,
                  dtype: str | None = None, max_shard_size: int | str = "2GB",
                  chat_template: str | None = None, overwrite: bool = False,
                  tensors: Iterable[tuple[str, np.ndarray]] | None = None,
                  stop_ids: list[int] | None = None) -> str:
  """Writes `params` (our layout, for `cfg`) as an HF model folder at `output`.

  `dtype` (default: the config's `param_dtype`) is the stored dtype; `tensors` replaces the
  default `convert.iter_hf_tensors(params, ...)` stream (e.g. LoRA-merged weights).
  `stop_ids` (a chat model's end-of-turn ids) join eos in generation_config.json, as Qwen and
  Llama-3 chat models list them, so `transformers.generate` stops at the end of a reply. In a
  multi-process run every process must call this; only process 0 writes files.
  """
  dtype = dtype or cfg.param_dtype
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  if tensors is None:
    tensors = convert.iter_hf_tensors(params, cfg, fetch=fetch_to_host, dtype=np_dtype)
  if jax.process_index() != 0:
    for _ in tensors:  # take part in every gather, write nothing
      pass
    return os.path.abspath(output)
  bos, eos, pad = (_special_id(tokenizer, n) for n in ("bos_id", "eos_id", "pad_id"))
  with atomic_output_dir(output, overwrite) as tmp:
    hf_cfg = convert.config_to_hf(cfg, dtype, bos, eos, pad)
    write_json(os.path.join(tmp, "config.json"), hf_cfg)
    if cfg.head == "score":
      if hf_cfg["pad_token_id"] is None:
        logging.warning("Reward model export without a pad or eos id (no tokenizer): "
                        "transformers scores it one row at a time; set pad_token_id in "
                        "config.json to score padded batches")
    else:  # a reward model does not generate: no generation_config.json
      stops = list(dict.fromkeys(([eos] if eos is not None else []) + list(stop_ids or [])))
      gen = {"bos_token_id": bos, "pad_token_id": pad,
             "eos_token_id": stops if len(stops) > 1 else eos}
      write_json(os.path.join(tmp, "generation_config.json"),
                 {k: v for k, v in gen.items() if v is not None})
    files = write_safetensors(tensors, tmp, max_shard_size)
    if tokenizer is not None:
      from llmjax.hf.tokenizer_files import write_tokenizer_files
      if cfg.qkv_bias and hasattr(
          tokenizer, "serialized_model_proto"):
        # transformers 5 maps model_type qwen2 to Qwen2Tokenizer whatever tokenizer_config
        # says, and that class rebuilds a byte-level tokenizer around our SentencePiece vocab.
        logging.warning("Qwen2 export with a SentencePiece tokenizer: with transformers>=5 "
                        "load it with PreTrainedTokenizerFast.from_pretrained(dir), not "
                        "AutoTokenizer")
      files += write_tokenizer_files(tokenizer, tmp, chat_template, cfg.max_seq_len)
    else:
      logging.warning("No tokenizer: the export has weights and config only")
  logging.info("Exported %s to %s: %s", convert.architecture_for(cfg), output, files)
  return os.path.abspath(output)


def _check_task(workdir: str, stage: str | None, step: int | None, task: str) -> None:
  """ConfigError unless the checkpoint export_run would read has the head `task` needs."""
  from llmjax.runs.load import checkpoint_head, default_stage, stage_heads
  want = TASKS[task]
  stage = stage or default_stage(workdir)
  have = checkpoint_head(workdir, stage, step)
  if have == want:
    return
  kinds = {"lm": "a language model (head 'lm')", "score": "a reward model (head 'score')"}
  others = [s for s, h in stage_heads(workdir).items() if h == want]
  hint = (f"the stage(s) with head {want!r} are {others}: pass --stage" if others
          else f"no stage of this run has head {want!r}")
  raise ConfigError(f"--task={task} needs head {want!r}, but {workdir} stage {stage!r} is "
                    f"{kinds.get(have, repr(have))}; {hint}")


def export_run(workdir: str, output: str, stage: str | None = None, step: int | None = None,
               dtype: str | None = None, max_shard_size: int | str = "2GB",
               overwrite: bool = False, adapter_only: bool = False,
               task: str | None = None) -> str:
  """Exports a run's (or an import's) checkpoint; see `export_params`.

  The architecture follows the checkpoint's head: *ForCausalLM for 'lm',
  *ForSequenceClassification for 'score' (a reward model). `task` ('causal_lm' or
  'reward', default either) asserts which one is wanted: a checkpoint without that head is
  an error, naming the run's stages that have it, and nothing is written.

  A LoRA/QLoRA checkpoint exports merged: each weight is `W + s * A B`, with a QLoRA base
  dequantized from NF4/int4 first, i.e. exactly the weights the trained model computes with.
  `adapter_only` writes the adapters alone as a PEFT folder instead
  (`llmjax.hf.adapters.export_adapter`).
  """
  from llmjax.runs.load import load_run
  if dtype is not None and dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is not supported: use one of {', '.join(DTYPES)}")
  parse_size(max_shard_size)  # fail on a bad flag before reading the checkpoint
  if task is not None and task not in TASKS:
    raise ConfigError(f"--task={task!r} is not supported: use one of {', '.join(TASKS)}")
  if task is not None:
    _check_task(workdir, stage, step, task)  # from the metadata alone, before any weights
  run = load_run(workdir, stage, step)
  if "quantization" in run.meta:
    raise CheckpointError(f"{workdir} (stage {run.stage}, step {run.step}) is a quantized "
                          "checkpoint (llmjax-quantize); an HF export holds float weights: "
                          f"export the run it was quantized from, {run.meta.get('source')}")
  if adapter_only:
    if run.model_cfg.head != "lm":
      raise ConfigError(f"{workdir} (stage {run.stage}) is a reward model (head "
                        f"{run.model_cfg.head!r}): --adapter_only writes causal-LM PEFT "
                        "adapters; export the merged model instead (drop --adapter_only)")
    from llmjax.hf.adapters import export_adapter
    return export_adapter(run, output, dtype=dtype, overwrite=overwrite)
  cfg = run.model_cfg
  tensors = convert.iter_hf_tensors(
      run.float_params(), cfg, fetch=fetch_to_host,
      dtype=np.dtype(jax.numpy.dtype(dtype or cfg.param_dtype)))
  stop_ids = None
  if run.tokenizer is not None and run.meta.get("chat_template_name"):
    from llmjax.data.chat import stop_token_ids
    stop_ids = stop_token_ids(run.tokenizer, run.meta["chat_template_name"])
  return export_params(None, cfg, output, tokenizer=run.tokenizer, dtype=dtype,
                       max_shard_size=max_shard_size, tensors=tensors,
                       chat_template=run.meta.get("chat_template"), overwrite=overwrite,
                       stop_ids=stop_ids)
