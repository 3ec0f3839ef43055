"""Scaling laws as pure functions: loss L(N, D) and the compute-optimal split of a budget.

N is parameters, D training tokens, C training FLOPs, and C = 6 N D throughout (forward +
backward of every weight, the accounting both papers plan with).

- Hoffmann et al. 2022 ("Chinchilla"), approach 3: L(N, D) = E + A / N^alpha + B / D^beta,
  with their published constants (N counts every parameter, embeddings included). Minimizing
  L under C = 6 N D gives the closed form of their eq. (4):
    N_opt = G (C/6)^a,  D_opt = G^-1 (C/6)^b,
    a = beta / (alpha + beta),  b = alpha / (alpha + beta),
    G = (alpha A / (beta B))^(1 / (alpha + beta)).
- The ~20 tokens per parameter rule of thumb read off Chinchilla's table 3: D = 20 N.
- Kaplan et al. 2020, fig. 14 / section 6.1: N_opt = 1.3e9 (C / PF-day)^0.73, N counting
  non-embedding parameters; D = C / (6 N).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from llmjax.errors import ConfigError

PF_DAY = 1e15 * 24 * 3600  # FLOPs in a petaflop/s-day, Kaplan et al.'s unit of compute


@dataclasses.dataclass(frozen=True)
class LossLaw:
  """L(N, D) = E + A / N^alpha + B / D^beta (loss in nats per token)."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float

  @property
  def a(self) -> float:
    """N_opt grows as C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """D_opt grows as C^b (a + b = 1)."""
    return self.alpha / (self.alpha + self.beta)

  @property
  def G(self) -> float:
    return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


# Hoffmann et al. 2022, eq. (10): their approach-3 fit on MassiveText.
CHINCHILLA = LossLaw(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)

# Hoffmann et al. 2022, table 3 (approach 1): (parameters, FLOPs, tokens), compute-optimal.
CHINCHILLA_TABLE3 = (
    (400e6, 1.92e19, 8.0e9),
    (1e9, 1.21e20, 20.2e9),
    (10e9, 1.23e22, 205.1e9),
    (67e9, 5.76e23, 1.5e12),
    (175e9, 3.85e24, 3.7e12),
    (280e9, 9.90e24, 5.9e12),
    (520e9, 3.43e25, 11.0e12),
    (1e12, 1.27e26, 21.2e12),
    (10e12, 1.30e28, 216.2e12),
)

KAPLAN_N_AT_PF_DAY = 1.3e9
KAPLAN_EXPONENT = 0.73
TOKENS_PER_PARAM = 20.0


def chinchilla_loss(n: float | np.ndarray, d: float | np.ndarray,
                    law: LossLaw = CHINCHILLA) -> float | np.ndarray:
  """L(N, D) of `law`; `n`, `d` broadcast (any shape)."""
  return law.E + law.A / np.power(n, law.alpha) + law.B / np.power(d, law.beta)


def _check_budget(flops: float) -> None:
  if not flops > 0 or not math.isfinite(flops):
    raise ConfigError(f"the compute budget must be a positive number of FLOPs, got {flops}")


def optimal_allocation(flops: float, law: LossLaw = CHINCHILLA) -> tuple[float, float]:
  """(N_opt, D_opt) minimizing L(N, D) subject to 6 N D = `flops` (the closed form above)."""
  _check_budget(flops)
  return law.G * (flops / 6.0) ** law.a, (flops / 6.0) ** law.b / law.G


def tokens_per_param_allocation(flops: float,
                                ratio: float = TOKENS_PER_PARAM) -> tuple[float, float]:
  """(N, D) with D = ratio * N and 6 N D = `flops`."""
  _check_budget(flops)
  n = math.sqrt(flops / (6.0 * ratio))
  return n, ratio * n


def kaplan_allocation(flops: float) -> tuple[float, float]:
  """(N, D) of Kaplan et al. 2020: N = 1.3e9 (C / PF-day)^0.73 (non-embedding), D = C / 6N."""
  _check_budget(flops)
  n = KAPLAN_N_AT_PF_DAY * (flops / PF_DAY) ** KAPLAN_EXPONENT
  return n, flops / (6.0 * n)


def compute_budget(flops: float | None = None, *, peak_flops: float | None = None,
                   devices: int = 1, hours: float | None = None,
                   mfu: float | None = None) -> float:
  """Training FLOPs: `flops` as given, or devices x hours x peak FLOP/s x MFU."""
  if flops is not None:
    _check_budget(flops)
    return float(flops)
  if peak_flops is None or hours is None or mfu is None:
    raise ConfigError("give a compute budget: --flops, or the hardware as --chip (or "
                      "--peak_flops), --devices, --hours and --mfu")
  if not 0 < mfu <= 1:
    raise ConfigError(f"--mfu is a fraction of peak in (0, 1], got {mfu}")
  if devices < 1 or hours <= 0:
    raise ConfigError(f"--devices must be >= 1 and --hours > 0, got {devices} and {hours}")
  return devices * hours * 3600.0 * peak_flops * mfu


def peak_flops_of_chip(name: str) -> tuple[str, float]:
  """(the table's name, dense bf16 peak FLOP/s) of a chip named as in `metrics.PEAK_BF16_FLOPS`,
  case-insensitively and without the vendor ('h100', 'v5p', 'TPU v4')."""
  from llmjax.metrics import PEAK_BF16_FLOPS
  wanted = name.lower().strip()
  for known, peak in PEAK_BF16_FLOPS.items():
    short = known.lower().removeprefix("nvidia ").removeprefix("tpu ")
    if wanted in (known.lower(), short):
      return known, peak
  raise ConfigError(f"--chip={name!r} is not in the table of peaks; choose one of "
                    f"{sorted(PEAK_BF16_FLOPS)} or give --peak_flops (FLOP/s per device)")
