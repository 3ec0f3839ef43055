"""The distill stage's batches: packed reference text, a fraction lambda of it made on-policy.

`DistillBatches` is a `loop.BatchSource`. Every step takes the next packed batch of the
off-policy stream (SFT conversations, packed whole as `stages.sft` packs them). With
probability `lmbda` (GKD's lambda, drawn from the seed and the step, so a resumed run draws
the same) the step is on-policy instead: every conversation in that batch keeps its prompt
(everything before its last reply) and the student, at its current parameters, samples a new
reply to it (`sample.sampler.sample_per_process`); the prompt + sampled reply sequences are
packed first-fit into the same `[rows, seq_len]` shape (a sequence that no longer fits is
dropped and counted) with `loss_mask` on the sampled tokens and `sampled` = 1 on every row.
This is TRL 1.16's GKD (`trl/experimental/gkd/gkd_trainer.py`: `random.random() <= lmbda`
per step; the batch's prompts, completions from `generate_on_policy_outputs`, labels on the
completion only), with the teacher then scoring the student's samples in the loss.

The source's state is the off-policy stream's position; the on-policy draws are functions
of (seed, step), so nothing else needs saving. The off-policy batches are the same on any
number of processes (`llmjax.data.global_order`), and so is a resume's; an on-policy step's
samples are drawn over the gathered prompts of all processes, so they depend on how many
there are (each pads its share to the largest).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from llmjax.parallel import distributed
from llmjax.sample.sampler import sample_per_process
from llmjax.train import loop


def is_on_policy_step(seed: int, step: int, lmbda: float) -> bool:
  """Whether step `step` samples its completions (probability `lmbda`), from (seed, step)."""
  if lmbda <= 0.0:
    return False
  return bool(np.random.default_rng([seed, step, 17]).random() < lmbda)


def prompts_of(batch: dict[str, np.ndarray]) -> list[list[int]]:
  """The prompt of every packed sequence in `batch`: its tokens up to its last reply.

  A sequence is one segment of a row (`segment_ids` > 0); its ids are its `tokens` plus its
  last `target`. The last reply starts at the last 0 -> 1 step of `loss_mask`; the prompt is
  every id before it (earlier turns' replies stay in the prompt as context). Row-major order.
  """
  out = []
  for r in range(len(batch["tokens"])):
    seg = batch["segment_ids"][r]
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      mask = batch["loss_mask"][r, idx]
      starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
      if not starts:
        continue
      # mask[i] marks target i, the id at position i + 1: the reply starts at id starts[-1] + 1.
      out.append(batch["tokens"][r, idx[:starts[-1] + 1]].tolist())
  return out


def pack_sequences(seqs: Sequence[tuple[Sequence[int], int]], rows: int,
                   seq_len: int) -> tuple[dict[str, np.ndarray], int]:
  """First-fit packs `(ids, prompt_len)` sequences into `[rows, seq_len]` training rows.

  Each sequence of n ids takes n - 1 positions (inputs ids[:-1], targets ids[1:]); its loss
  mask is 1 on the targets after the prompt (the sampled reply). Returns the batch (the
  `llmjax.data.pipeline` layout: tokens, targets, positions, segment_ids 1.. per row, 0 on
  padding, loss_mask) and how many sequences did not fit anywhere (dropped).
  """
  batch = {k: np.zeros((rows, seq_len), np.int32)
           for k in ("tokens", "targets", "positions", "segment_ids", "loss_mask")}
  used = np.zeros(rows, np.int64)
  segments = np.zeros(rows, np.int64)
  dropped = 0
  for ids, prompt_len in seqs:
    n = len(ids) - 1
    fits = np.flatnonzero(used + n <= seq_len)
    if n < 1 or not len(fits):
      dropped += 1
      continue
    r, at = int(fits[0]), int(used[fits[0]])
    cols = slice(at, at + n)
    segments[r] += 1
    batch["tokens"][r, cols] = ids[:-1]
    batch["targets"][r, cols] = ids[1:]
    batch["positions"][r, cols] = np.arange(n)
    batch["segment_ids"][r, cols] = segments[r]
    batch["loss_mask"][r, at + prompt_len - 1:at + n] = 1
    used[r] += n
  return batch, dropped


class DistillBatches(loop.BatchSource):
  """Off-policy packed batches, a fraction `lmbda` of steps on-policy (see the module doc)."""

  def __init__(self, batches: Any, make_sampler: Callable[[Any, Any], Any], *, lmbda: float,
               seed: int, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0):
    """
    Args:
      batches: this process's packed batches (`[rows, seq_len]` numpy arrays), e.g.
        `instructions.train_batches`.
      make_sampler: (graphdef, params) -> a `Sampler` over the student's current parameters.
      lmbda: the probability that a step is on-policy (0: never, 1: always).
      max_new_tokens, temperature, top_k, top_p: how replies are sampled.
    """
    self.iterator = iter(batches)
    self.make_sampler = make_sampler
    self.lmbda, self.seed = lmbda, seed
    self.sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p)
    self._pending: dict[str, list[float]] = {}

  def next_batch(self, view: loop.PolicyView) -> dict[str, np.ndarray]:
    batch = dict(next(self.iterator))
    rows = len(batch["tokens"])
    on_policy = is_on_policy_step(self.seed, view.step, self.lmbda)
    if on_policy:
      batch = self._on_policy(view, batch)
    self._record(on_policy=float(on_policy))
    batch["sampled"] = np.full(rows, float(on_policy), np.float32)
    return batch

  def _on_policy(self, view: loop.PolicyView, batch: dict[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    rows, seq_len = batch["tokens"].shape
    prompts = prompts_of(batch)
    # sample_per_process needs as many prompts on every process: pad with repeats, discarded.
    n = len(prompts)
    wanted = int(distributed.gather_floats([n]).max())
    start = time.time()
    sampler = self.make_sampler(view.graphdef, view.params)
    out = sample_per_process(sampler, prompts + [prompts[0]] * (wanted - n),
                             seed=int(np.random.default_rng([self.seed, view.step]).integers(
                                 2**31)), **self.sampling)
    seconds = time.time() - start
    seqs = [(prompts[i] + out.completion(i), len(prompts[i])) for i in range(n)]
    packed, dropped = pack_sequences(seqs, rows, seq_len)
    lengths = out.lengths[:n, 0]
    self._record(sample_seconds=seconds,
                 sample_tokens_per_sec=float(lengths.sum() / max(seconds, 1e-9)),
                 completion_length=float(lengths.mean()),
                 truncated_fraction=float(1.0 - out.stopped[:n, 0].mean()),
                 on_policy_dropped=dropped / max(n, 1))
    return packed

  def _record(self, **values: float) -> None:
    for k, v in values.items():
      self._pending.setdefault(k, []).append(v)

  def metrics(self) -> dict[str, float]:
    """Means since the last call: `on_policy` is the fraction of steps that sampled."""
    out = {k: float(np.mean(v)) for k, v in self._pending.items() if v}
    self._pending = {}
    return out

  @property
  def restores_on_any_process_count(self) -> bool:
    return getattr(self.iterator, "restores_on_any_process_count", False)

  def get_state(self) -> bytes:
    return self.iterator.get_state()

  def set_state(self, state: bytes) -> None:
    self.iterator.set_state(state)
