"""Numbers a user can trust: model FLOPs, MFU, tokens/s; and where they are written.

Every logged step goes to three places: `metrics.jsonl` (one JSON object per line, the
machine-readable record), TensorBoard event files, and a progress line on the console.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import jax

from llmjax.model.config import ModelConfig

# Dense bf16 peak FLOP/s per chip, from the vendors' data sheets (no sparsity). On these
# GPUs dense fp16 peaks equal bf16's, so MFU of a float16 run uses the same number; TPUs
# refuse float16 compute (model/config.py: check_dtype_on_backend).
PEAK_BF16_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e reports itself as "TPU v5 lite"
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,  # SXM; PCIe cards are slower and match this prefix too
    "NVIDIA H200": 989e12,
    "NVIDIA GH200": 989e12,
}


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  """The chip's dense bf16 (= fp16 on GPUs) peak, or None when unknown (CPUs: pass it in)."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BF16_FLOPS[prefix]
  return None


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: forward + backward (x3) of every matmul, attention included.

  6 * (matmul parameters) + 12 * layers * heads * head_dim * seq_len, the PaLM appendix-B
  accounting. The input embedding is a lookup, not a matmul; the output projection is one
  even when tied. A mixture of experts counts the parameters a token computes with (its
  top-k experts, the router, the shared expert: `num_active_params`), so MFU measures
  useful work, not the experts a token skips.
  """
  # The output projection: the vocab matrix, or nothing more for a reward model (its score
  # head is one of num_params' non-embedding parameters).
  head = 0 if cfg.head == "score" else cfg.d_model * cfg.vocab_size
  matmul_params = cfg.num_active_params(include_embeddings=False) + head
  attention = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
  return 6.0 * matmul_params + attention


def unigram_loss(batches: list[dict]) -> float:
  """Cross-entropy (nats/token) of the best context-free model of these batches' targets.

  The entropy of the target unigram distribution: what a model that ignores context can at
  best reach. A language model is learning context once its loss falls well below this.
  """
  import numpy as np
  targets = np.concatenate([b["targets"].ravel() for b in batches])
  weights = np.concatenate([(b["loss_mask"] * (b["segment_ids"] != 0)).ravel() for b in batches])
  counts = np.bincount(targets[weights > 0])
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


class MetricsWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard, and draws console progress.

  A resumed stage redoes the steps after its last checkpoint: the loop calls `resume_from`
  with the restored step, which drops this stage's rows past it, so the file holds one row
  per (stage, kind, step) and TensorBoard one curve. A row whose (kind, step) this stage
  already has (the step-0 baseline or data counts of a restart) is not written again.
  """

  def __init__(self, workdir: str, stage: str, total_steps: int, enabled: bool = True):
    self.stage = stage
    self.total_steps = total_steps
    self.enabled = enabled  # only process 0 writes in multi-host runs
    self._tty = sys.stderr.isatty()
    self._start = time.time()
    self._tb = None  # the open TensorBoard event file (tensorboardX's EventsWriter)
    self._tb_flushed = 0.0  # when it was last flushed to disk
    self._tb_dir = os.path.join(workdir, "tensorboard", stage)
    self._purge_step: int | None = None
    self._jsonl = None
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._written: set[tuple[str, int]] = set()  # (kind, step) of this stage's rows
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._written = {(r["kind"], r["step"]) for r in _read_rows(self._path)
                       if r.get("stage") == stage}
      self._jsonl = open(self._path, "a", buffering=1)

  def resume_from(self, step: int) -> None:
    """Forgets this stage's records past `step` (the step the stage resumes from)."""
    if not self.enabled:
      return
    if any(s > step for _, s in self._written):
      self._jsonl.close()
      keep = [r for r in _read_rows(self._path) if r.get("stage") != self.stage
              or r.get("step", 0) <= step]
      with open(self._path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(self._path + ".tmp", self._path)
      self._jsonl = open(self._path, "a", buffering=1)
      self._written = {(k, s) for k, s in self._written if s <= step}
    # TensorBoard keeps old event files; a purge step hides their events from it onwards.
    self._purge_step = step + 1
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def _tensorboard(self):
    """The event file, opened as tensorboardX's SummaryWriter opens one, but written here on
    the calling thread: SummaryWriter sends each event through a multiprocessing queue to a
    writer thread, which (with the thread that fed it) cost a small model's step several ms
    of CPU at log_every=1, more than writing the event itself (~0.5 ms)."""
    if self._tb is None:
      # Imported late: heavy, and only process 0 needs it.
      from tensorboardX.event_file_writer import EventsWriter
      from tensorboardX.proto.event_pb2 import Event, SessionLog
      os.makedirs(self._tb_dir, exist_ok=True)
      # Event files are named by the second they open in: a suffix keeps two writers of one
      # stage within a second (a resumed loop, the stage's time record) from sharing a file.
      self._tb = EventsWriter(os.path.join(self._tb_dir, "events"), f".{time.time_ns()}")
      if self._purge_step is not None:  # hides older files' events from this step on
        now = time.time()
        self._tb.write_event(Event(step=self._purge_step, wall_time=now,
                                   file_version="brain.Event:2"))
        self._tb.write_event(Event(step=self._purge_step, wall_time=now,
                                   session_log=SessionLog(status=SessionLog.START)))
      self._tb_flushed = time.time()
    return self._tb

  def write(self, step: int, metrics: dict[str, Any], kind: str = "train") -> None:
    """One record: `{"stage", "step", "kind", **metrics}`; eval records have kind 'eval'."""
    if not self.enabled or (kind, step) in self._written:
      return
    clean = {k: _plain(v) for k, v in metrics.items()}
    record = {"stage": self.stage, "step": step, "kind": kind, **clean}
    self._jsonl.write(json.dumps(record) + "\n")
    self._written.add((kind, step))
    self._write_tensorboard(step, clean, kind)
    self._console(step, clean, kind)

  def _write_tensorboard(self, step: int, clean: dict[str, Any], kind: str) -> None:
    # One event with every scalar of the record (add_scalar writes one event per scalar):
    # TensorBoard shows the same (tag, step, value) points, for a fraction of the bytes to
    # checksum (tensorboardX's crc32c is pure Python).
    # Summary.Value built directly: tensorboardX's `scalar()` wraps each in a Summary of its
    # own through numpy (~17 us a scalar, a tenth of a millisecond per record).
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.proto.summary_pb2 import Summary
    from tensorboardX.summary import _clean_tag
    values = [Summary.Value(tag=_clean_tag(f"{kind}/{name}"), simple_value=float(value))
              for name, value in clean.items()
              if isinstance(value, (int, float)) and value is not None]
    if not values:
      return
    tb = self._tensorboard()
    tb.write_event(Event(step=step, wall_time=time.time(), summary=Summary(value=values)))
    if time.time() - self._tb_flushed > 30:  # to disk now and then (a flush fsyncs)
      tb.flush()
      self._tb_flushed = time.time()

  def _console(self, step: int, m: dict[str, Any], kind: str) -> None:
    if kind != "train":
      # Counts (the data record's) as integers, measurements to 4 significant digits.
      text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in m.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool))
      if text:
        self._print(f"[{self.stage}] {kind} @ step {step}: {text}", newline=True)
      return
    frac = step / max(self.total_steps, 1)
    bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
    elapsed = time.time() - self._start
    parts = [f"[{self.stage}] |{bar}| {step}/{self.total_steps}", f"loss {m.get('loss', 0):.4f}"]
    if m.get("tokens_per_sec"):
      parts.append(f"{m['tokens_per_sec']:,.0f} tok/s")
    if m.get("mfu") is not None:
      parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if m.get("pipeline_bubble") is not None:  # the pipeline's idle share, by its formula
      parts.append(f"bubble {100 * m['pipeline_bubble']:.0f}% (expected)")
    if m.get("loss_scale") is not None:  # float16 training: the scale and the steps it skipped
      parts.append(f"loss scale {m['loss_scale']:g} ({m.get('skipped_steps', 0)} skipped)")
    parts.append(f"elapsed {_hms(elapsed)}")
    self._print("  ".join(parts), newline=not self._tty or step >= self.total_steps)

  def _print(self, text: str, newline: bool) -> None:
    if self._tty:
      sys.stderr.write("\r\033[K" + text + ("\n" if newline else ""))
    else:
      sys.stderr.write(text + "\n")
    sys.stderr.flush()

  def close(self) -> None:
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()


def _plain(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  return float(v) if isinstance(v, float) else v


def _hms(seconds: float) -> str:
  m, s = divmod(int(seconds), 60)
  h, m = divmod(m, 60)
  return f"{h}:{m:02d}:{s:02d}"


def _read_rows(path: str) -> list[dict[str, Any]]:
  """The records of a metrics file; a line cut short by a crash is dropped."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return rows


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of `metrics.jsonl` (tests and report cards read runs through this)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
