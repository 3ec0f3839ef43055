"""Reference log-probs computed once, before training, and kept with the run.

DPO compares the policy with a frozen reference on the same pairs. Rather than holding the
reference model in memory and running it every step, one pass over the data computes each
pair's reference log-probs; they ride along in the batches (`ref_logps`) and are saved in
the workdir, so a resumed run reads them back instead of recomputing them. A fingerprint of
the tokenized pairs and the reference's source guards against reusing a stale table.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from llmjax.data import preferences
from llmjax.parallel import mesh as mesh_lib
from llmjax.preference.logps import pair_logps


def fingerprint(splits: dict[str, Sequence[dict[str, np.ndarray]]], source: Any) -> str:
  """sha256 of every example's tokens and completion mask, and of the reference's source."""
  h = hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode())
  for name in sorted(splits):
    h.update(name.encode())
    for ex in splits[name]:
      for key in ("inputs", "loss_mask"):
        h.update(np.ascontiguousarray(ex[key]).tobytes())
  return h.hexdigest()


def compute_table(graphdef: nnx.GraphDef, params: Any, examples: list[dict[str, np.ndarray]],
                  cfg: preferences.PreferenceDataConfig, mesh: Mesh,
                  rules: mesh_lib.Rules, chunk_size: int = 0) -> np.ndarray:
  """`[len(examples), 2]` float32: (chosen, rejected) completion log-prob sums of each example
  under the model (graphdef, params), its output layer over `chunk_size` positions at a time
  when > 0 (`TrainConfig.loss_chunk_size`, as the training step).

  Every process runs the same batches (all examples, in order), with rows split over the
  mesh's batch axes, and receives every result.
  """
  max_pairs = cfg.max_pairs_per_row
  rep = mesh_lib.replicated(mesh)
  batch_shard = mesh_lib.batch_sharding(mesh, rules)

  @jax.jit
  def run(p, batch):
    with mesh_lib.activation_sharding(mesh, rules):
      out = pair_logps(nnx.merge(graphdef, p), batch, max_pairs, chunk_size)
    # Every process gets every result (the batches are the same on all of them).
    return jax.lax.with_sharding_constraint((out.chosen, out.rejected), rep)

  table = np.full((len(examples), 2), np.nan, np.float32)
  for batch in preferences.pair_batches_in_order(examples, cfg):
    index = batch.pop("pair_index")
    batch = {k: jax.device_put(v, batch_shard) for k, v in batch.items()}
    chosen, rejected = jax.device_get(run(params, batch))
    hit = index >= 0
    table[index[hit], 0] = chosen[hit]
    table[index[hit], 1] = rejected[hit]
  if np.isnan(table).any():
    raise AssertionError("reference pass missed examples")  # a bug, not bad input
  return table


def load_or_compute(path: str, splits: dict[str, list[dict[str, np.ndarray]]], source: Any,
                    compute) -> dict[str, np.ndarray]:
  """The tables of `splits` from `path` when its fingerprint matches, else `compute(examples)`
  per split, saved to `path` (by process 0, atomically)."""
  key = fingerprint(splits, source)
  if os.path.exists(path):
    with np.load(path) as saved:
      if str(saved["fingerprint"]) == key:
        logging.info("reference log-probs: reusing %s", path)
        return {name: saved[name] for name in splits}
    logging.warning("%s was computed for other data or another reference: recomputing", path)
  tables = {name: compute(examples) for name, examples in splits.items()}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=np.array(key), **tables)
    os.replace(tmp, path)
  return tables
