"""Shape buckets: sizes rounded up to a power of two, so that jitted functions fed
variable-length work (generation, reward scoring) compile a few shapes, not one per call."""


def pow2_at_least(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= n, and at least `minimum`."""
  return max(minimum, 1 << max(0, (n - 1).bit_length()))
