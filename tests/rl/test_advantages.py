"""GRPO and RLOO advantages against the papers' formulas, worked out here with plain `math`."""

import math

import numpy as np
import pytest

from llmjax.errors import ConfigError
from llmjax.rl import advantages as A

# Two prompts x three completions, prompt-major.
REWARDS = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0]
G = 3


def unbiased_std(xs):
  m = sum(xs) / len(xs)
  return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def test_group_scale_is_unbiased_group_std_plus_eps():
  # Group 0: mean 0.5, unbiased std 0.5; group 1 has no spread.
  want = [(r - 0.5) / (0.5 + 1e-4) for r in REWARDS[:3]] + [0.0, 0.0, 0.0]
  np.testing.assert_allclose(A.group_advantages(REWARDS, G), want, rtol=1e-6, atol=1e-7)


def test_batch_scale_subtracts_group_mean_divides_by_batch_std():
  s = unbiased_std(REWARDS)
  want = [(r - 0.5) / (s + 1e-4) for r in REWARDS[:3]] + [0.0, 0.0, 0.0]
  np.testing.assert_allclose(A.group_advantages(REWARDS, G, scale="batch"), want, rtol=1e-6)


def test_none_scale_and_custom_eps():
  np.testing.assert_allclose(A.group_advantages(REWARDS, G, scale="none"),
                             [0.5, -0.5, 0.0, 0.0, 0.0, 0.0], atol=1e-7)
  got = A.group_advantages([1.0, 3.0], 2, eps=0.5)
  s = math.sqrt(2.0)  # unbiased std of {1, 3}
  np.testing.assert_allclose(got, [-1.0 / (s + 0.5), 1.0 / (s + 0.5)], rtol=1e-6)


def test_nan_reward_is_left_out_and_gets_zero():
  got = A.group_advantages([1.0, float("nan"), 3.0, 0.0], 2)
  # Group 0: only 1.0 scores (std undefined -> advantage 0, as TRL); group 1: {3, 0}.
  s = unbiased_std([3.0, 0.0])
  np.testing.assert_allclose(got, [0.0, 0.0, 1.5 / (s + 1e-4), -1.5 / (s + 1e-4)], rtol=1e-6)


def test_leave_one_out():
  got = A.leave_one_out_advantages(REWARDS, G)
  want = [1.0 - 0.25, 0.0 - 0.75, 0.5 - 0.5, 0.0, 0.0, 0.0]
  np.testing.assert_allclose(got, want, atol=1e-7)
  # G/(G-1) times the mean-centred reward.
  np.testing.assert_allclose(got, 1.5 * np.asarray(A.group_advantages(REWARDS, G, scale="none")),
                             atol=1e-6)


def test_leave_one_out_skips_nan():
  got = A.leave_one_out_advantages([1.0, float("nan"), 4.0, 2.0, 0.0, float("nan")], 3)
  np.testing.assert_allclose(got, [1.0 - 4.0, 0.0, 4.0 - 1.0, 2.0, -2.0, 0.0], atol=1e-7)


def test_zero_spread_groups():
  got = A.zero_spread_groups([1.0, 1.0, 0.0, 1.0, 0.5, 0.5, float("nan"), float("nan")], 2)
  assert got.tolist() == [True, False, True, True]


@pytest.mark.parametrize("call, match", [
    (lambda: A.group_advantages([1.0, 2.0], 1), "group_size >= 2"),
    (lambda: A.group_advantages([1.0, 2.0, 3.0], 2), "groups of group_size=2"),
    (lambda: A.group_advantages([1.0, 2.0], 2, scale="rank"), "scale 'rank' is unknown"),
    (lambda: A.group_advantages([1.0, 2.0], 2, eps=0.0), "eps must be > 0"),
    (lambda: A.group_advantages([[1.0, 2.0]], 2), "1-D"),
    (lambda: A.leave_one_out_advantages([1.0, 2.0], 1), "group_size >= 2"),
    (lambda: A.zero_spread_groups([1.0, 2.0, 3.0], 0), "positive int"),
])
def test_validation(call, match):
  with pytest.raises(ConfigError, match=match):
    call()


def test_group_size_one_without_scaling_is_allowed():
  np.testing.assert_allclose(A.group_advantages([1.0, 2.0], 1, scale="none"), [0.0, 0.0])
