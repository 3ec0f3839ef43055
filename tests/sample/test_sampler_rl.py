"""What RL rollouts need from the sampler: parameters per call without recompiling, a runtime
top-k equal to the old static one, windowed decode equal to whole-cache decode, and
log-probs that match the training forward pass."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.sample import sampler as sampler_lib
from llmjax.sample.sampler import Sampler, decode_windows, logprob_gap
from llmjax.train.loop import init_params

from tests.conftest import TEST_MODEL

# As in test_sampler: a larger init keeps greedy choices away from float near-ties.
MODEL = dataclasses.replace(TEST_MODEL, init_std=0.2)
NEW = 12


@pytest.fixture(scope="module")
def model():
  return init_params(MODEL, seed=0)


@pytest.fixture(scope="module")
def other_params(model):
  """Different values, same structure, shapes, dtypes and placement."""
  return init_params(MODEL, seed=1)[1]


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(4, MODEL.vocab_size, size=n).tolist() for n in (5, 17, 9, 30)]


SAMPLED = dict(max_new_tokens=NEW, num_samples=2, temperature=1.0, top_k=20, seed=5)


def test_params_per_call_are_used_without_recompiling(model, other_params, prompts):
  graphdef, params = model
  sampler = Sampler(graphdef, params, eos_ids=[])
  a = sampler.sample(prompts, **SAMPLED)  # warm-up: compiles this bucket once
  compiled = sampler_lib._generate._cache_size()
  b = sampler.sample(prompts, params=other_params, **SAMPLED)
  again = sampler.sample(prompts, params=params, **SAMPLED)
  assert sampler_lib._generate._cache_size() == compiled
  assert not np.array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(again.tokens, a.tokens)
  # The same as a sampler built on those params: nothing of the constructor's leaks in.
  fresh = Sampler(graphdef, other_params, eos_ids=[]).sample(prompts, **SAMPLED)
  np.testing.assert_array_equal(b.tokens, fresh.tokens)
  np.testing.assert_array_equal(b.logprobs, fresh.logprobs)


def test_rollouts_follow_an_optimizer_update(model, prompts):
  """An SGD step that raises the log-likelihood of one target sequence: the next rollouts
  (same sampler, same seed) come from the updated params, greedy moving toward the target."""
  graphdef, params = model
  sampler = Sampler(graphdef, params, eos_ids=[])
  before = sampler.sample(prompts[:1], max_new_tokens=NEW)
  target = jnp.asarray([prompts[0] + [7] * NEW])

  def nll(p):
    logits = nnx.merge(graphdef, p)(target)[0, len(prompts[0]) - 1:-1]
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 7])
  # Jitted: op by op, the three backward passes took most of this test's 11 s.
  nll, grad_nll = jax.jit(nll), jax.jit(jax.grad(nll))
  compiled = sampler_lib._generate._cache_size()
  updated = params
  for _ in range(3):
    grads = grad_nll(updated)
    updated = jax.tree.map(lambda p, g: p - 1.0 * g, updated, grads)
  after = sampler.sample(prompts[:1], max_new_tokens=NEW, params=updated)
  assert sampler_lib._generate._cache_size() == compiled
  assert before.completion(0) != after.completion(0)
  assert after.completion(0).count(7) > before.completion(0).count(7)
  assert float(nll(updated)) < float(nll(params))
  # The constructor's params are untouched: without params= the old rollouts come back.
  np.testing.assert_array_equal(sampler.sample(prompts[:1], max_new_tokens=NEW).tokens,
                                before.tokens)


def _choose_static_top_k(logits, key, temperature, top_p, *, top_k, use_top_p):
  """The sampler's choice before top-k became a runtime value (static `top_k`), verbatim."""
  x = logits / temperature
  idx = None
  if top_k > 0:
    x, idx = jax.lax.top_k(x, top_k)
  if use_top_p:
    if idx is None:
      idx = jnp.argsort(-x, axis=-1)
      x = jnp.take_along_axis(x, idx, axis=-1)
    probs = jax.nn.softmax(x, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    x = jnp.where(keep, x, -jnp.inf)
  choice = jax.random.categorical(key, x, axis=-1)
  logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), choice[:, None], axis=-1)[:, 0]
  token = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), logp


@pytest.mark.parametrize("top_k,top_p", [(1, 1.0), (3, 1.0), (5, 0.8), (16, 1.0), (17, 0.9),
                                         (50, 1.0), (512, 0.95)])
def test_runtime_top_k_draws_the_same_tokens_as_static_top_k(top_k, top_p):
  logits = jax.random.normal(jax.random.key(0), (8, MODEL.vocab_size)) * 3
  bucket = sampler_lib._top_k_bucket(top_k, MODEL.vocab_size)
  new = jax.jit(lambda l, key, k: sampler_lib._choose(
      l, key, jnp.float32(0.9), jnp.float32(top_p), k, greedy=False, top_k_bucket=bucket,
      use_top_p=top_p < 1))
  old = jax.jit(lambda l, key: _choose_static_top_k(l, key, jnp.float32(0.9), jnp.float32(top_p),
                                                    top_k=top_k, use_top_p=top_p < 1))
  for seed in range(20):
    key = jax.random.key(seed)
    token, logp = new(logits, key, jnp.int32(top_k))
    ref_token, ref_logp = old(logits, key)
    np.testing.assert_array_equal(token, ref_token)
    np.testing.assert_allclose(logp, ref_logp, atol=1e-6)


def test_top_k_values_in_one_bucket_share_a_program(model, prompts):
  graphdef, params = model
  sampler = Sampler(graphdef, params, eos_ids=[])
  kw = dict(max_new_tokens=NEW, temperature=1.0, seed=2)
  k3 = sampler.sample(prompts, top_k=3, **kw)
  compiled = sampler_lib._generate._cache_size()
  k9 = sampler.sample(prompts, top_k=9, **kw)
  k1 = sampler.sample(prompts, top_k=1, **kw)
  assert sampler_lib._generate._cache_size() == compiled
  assert not np.array_equal(k3.tokens, k9.tokens)
  greedy = sampler.sample(prompts, max_new_tokens=NEW)
  np.testing.assert_array_equal(k1.tokens, greedy.tokens)


def test_decode_windows():
  assert decode_windows(32, 16) == (16,)
  assert decode_windows(32, 128) == (16, 64, 128)
  assert decode_windows(32, 512) == (16, 64, 256, 512)
  assert decode_windows(1024, 512) == (16, 512)
  for prompt, new in [(16, 1024), (64, 2048), (4096, 256)]:
    ends = decode_windows(prompt, new)
    assert ends[-1] == new and list(ends) == sorted(set(ends))
    # Every window at least doubles the total cache length of the one before.
    assert all(prompt + b >= 2 * (prompt + a) for a, b in zip(ends[:-2], ends[1:-1]))


LONG = 100  # new-token bucket 128: windows end at 16, 64 and 128 new tokens


def test_long_budget_across_windows_equals_full_recomputation(model, prompts):
  graphdef, params = model
  width = 160
  forward = jax.jit(lambda p, t, length: nnx.merge(graphdef, p)(t)[0, length - 1])
  out = Sampler(graphdef, params, eos_ids=[]).sample(prompts, max_new_tokens=LONG)
  right = Sampler(graphdef, params, eos_ids=[], pad_side="right").sample(
      prompts, max_new_tokens=LONG)
  np.testing.assert_array_equal(right.tokens, out.tokens)
  for i, prompt in enumerate(prompts[:2]):
    tokens = list(prompt)
    for _ in range(LONG):
      buffer = jnp.asarray([tokens + [0] * (width - len(tokens))])
      tokens.append(int(jnp.argmax(forward(params, buffer, len(tokens)))))
    assert out.completion(i) == tokens[len(prompt):]
  assert logprob_gap(graphdef, params, prompts, out) < 1e-4


def test_windowed_decode_equals_whole_cache_decode(model, prompts, monkeypatch):
  """The same program with one window (the whole bucket, the sampler before windows).

  Greedy: the two programs' logits differ by float noise (~1e-6), which under sampling flips
  a draw that lands on a nucleus or CDF boundary on some CPUs and then every later token; the
  windows are the same code for every sampling mode."""
  graphdef, params = model
  kw = dict(max_new_tokens=LONG, num_samples=1, temperature=0.0)
  windowed = Sampler(graphdef, params, eos_ids=[]).sample(prompts, **kw)
  sampler_lib._generate.clear_cache()
  monkeypatch.setattr(sampler_lib, "decode_windows", lambda prompt_len, new_bucket: (new_bucket,))
  whole = Sampler(graphdef, params, eos_ids=[]).sample(prompts, **kw)
  sampler_lib._generate.clear_cache()  # no whole-cache program left for later tests
  np.testing.assert_array_equal(windowed.tokens, whole.tokens)
  np.testing.assert_allclose(windowed.logprobs, whole.logprobs, atol=1e-5)
  np.testing.assert_allclose(windowed.sampling_logprobs, whole.sampling_logprobs, atol=1e-5)


def test_logprob_gap_is_tiny_in_float32(model, prompts):
  graphdef, params = model
  kw = dict(max_new_tokens=40, num_samples=3, temperature=1.0, top_k=30, seed=4)
  free = Sampler(graphdef, params, eos_ids=[]).sample(prompts, **kw)
  # Stop tokens drawn from the free run: rows stop at different lengths (same seed, same draws).
  eos = [int(free.tokens[0, 0, 10]), int(free.tokens[2, 1, 25])]
  out = Sampler(graphdef, params, eos_ids=eos).sample(prompts, **kw)
  assert len(set(out.lengths.ravel().tolist())) > 1
  gap = logprob_gap(graphdef, params, prompts, out, batch_size=4)
  assert 0 <= gap < 1e-4
  # It measures something: against other params the gap is large.
  other = jax.tree.map(lambda x: x * 1.5, params)
  assert logprob_gap(graphdef, other, prompts, out) > 1e-2
