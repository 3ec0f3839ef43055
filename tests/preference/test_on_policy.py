"""On-policy pairs from sampled answers (pure part): which sample is chosen over which."""

import pytest

from llmjax.errors import ConfigError
from llmjax.preference.on_policy import OnPolicyPairs, pairs_from_samples

Q = [{"role": "user", "content": "Where does Alice live?"}]


def reply(text):
  return [{"role": "assistant", "content": text}]


def test_each_distinct_wrong_sample_is_rejected_against_the_right_ones_in_turn():
  samples = ["Oslo", "Paris", "oslo.", "Rome", "Paris", "Lima"]
  correct = [True, False, True, False, False, False]
  pairs = pairs_from_samples(Q, samples, correct, reference="Oslo")
  # Wrong, distinct, in order: Paris, Rome, Lima; right, distinct: 'Oslo', 'oslo.' (cycled).
  assert pairs == [{"prompt": Q, "chosen": reply("Oslo"), "rejected": reply("Paris")},
                   {"prompt": Q, "chosen": reply("oslo."), "rejected": reply("Rome")},
                   {"prompt": Q, "chosen": reply("Oslo"), "rejected": reply("Lima")}]


def test_the_reference_is_chosen_when_no_sample_is_right_and_all_right_gives_none():
  pairs = pairs_from_samples(Q, ["Paris", "7", "Paris"], [False, False, False], "Oslo")
  assert [(p["chosen"], p["rejected"]) for p in pairs] == [(reply("Oslo"), reply("Paris")),
                                                           (reply("Oslo"), reply("7"))]
  assert pairs_from_samples(Q, ["Oslo", "Oslo"], [True, True], "Oslo") == []
  with pytest.raises(ValueError, match="2 samples but 1"):
    pairs_from_samples(Q, ["a", "b"], [True], "a")


def test_bad_settings_are_refused():
  with pytest.raises(ConfigError, match="samples=0"):
    OnPolicyPairs(samples=0)
  with pytest.raises(ConfigError, match="temperature > 0"):
    OnPolicyPairs(temperature=0.0)
