"""Multi-process start-up: `jax.distributed.initialize` from flags, environment or cluster."""

from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _cluster_detected() -> str | None:
  """The cluster jax can auto-configure itself on, if this process runs on one."""
  if os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1 or \
      os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "Cloud TPU"
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and os.environ.get("SLURM_JOB_ID"):
    return "SLURM"
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    return "JAX_COORDINATOR_ADDRESS"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  """Joins this process to a multi-process run, or does nothing for a single process.

  Explicit arguments win (e.g. several processes on one machine); otherwise a Cloud TPU
  slice, a SLURM job or `JAX_COORDINATOR_ADDRESS`/`JAX_NUM_PROCESSES`/`JAX_PROCESS_ID` in
  the environment are detected; `auto` leaves all detection to jax (Cloud TPU VMs, where
  the slice is described by the metadata server). Must run before anything touches a device.
  """
  if auto and coordinator_address is None:
    jax.distributed.initialize()
  elif coordinator_address is None and num_processes is None:
    cluster = _cluster_detected()
    if cluster is None:
      return
    logging.info("Multi-process run detected (%s)", cluster)
    if cluster == "JAX_COORDINATOR_ADDRESS":
      coordinator_address = os.environ["JAX_COORDINATOR_ADDRESS"]
      num_processes = int(os.environ["JAX_NUM_PROCESSES"])
      process_id = int(os.environ["JAX_PROCESS_ID"])
    _initialize(coordinator_address, num_processes, process_id)
  else:
    _initialize(coordinator_address, num_processes, process_id)
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def _initialize(coordinator_address, num_processes, process_id) -> None:
  # CPU devices of different processes need a collectives backend (tests, CPU clusters);
  # the setting touches only the CPU client, so it is harmless next to GPUs and TPUs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def allgather_token_lists(lists: Sequence[Sequence[int]]) -> list[list[int]]:
  """Every process's token id lists (ragged), process-major: process 0's, then 1's, ...

  Each process must pass as many lists. A single process gets its own lists back unchanged.
  """
  if jax.process_count() == 1:
    return [list(x) for x in lists]
  lengths = multihost_utils.process_allgather(np.asarray([len(x) for x in lists], np.int32))
  width = max(1, int(lengths.max()))
  padded = np.full((len(lists), width), -1, np.int32)
  for i, x in enumerate(lists):
    padded[i, :len(x)] = x
  everyone = multihost_utils.process_allgather(padded)  # [processes, n, width]
  return [everyone[p, i, :lengths[p, i]].tolist()
          for p in range(everyone.shape[0]) for i in range(everyone.shape[1])]


def gather_floats(values: Sequence[float]) -> np.ndarray:
  """`[processes, k]`: every process's float vector (a collective: every process calls it)."""
  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values[None]
  return np.asarray(multihost_utils.process_allgather(values))


def any_process(flag: bool) -> bool:
  """True when `flag` is true on at least one process (a collective: every process calls it)."""
  return bool(gather_floats([float(flag)]).max() > 0)
