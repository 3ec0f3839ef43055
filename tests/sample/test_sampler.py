"""The KV-cache sampler against full recomputation, and its padding/batching invariances."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.errors import ConfigError
from llmjax.sample.sampler import Sampler
from llmjax.train.loop import init_params

from tests.conftest import TEST_MODEL

NEW = 12
# A larger init spreads the logits of a random model, so greedy choices are not near-ties that
# float reassociation could flip; the comparisons below are then exact.
MODEL = dataclasses.replace(TEST_MODEL, init_std=0.2)


@pytest.fixture(scope="module")
def model():
  return init_params(MODEL, seed=0)


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [rng.integers(4, MODEL.vocab_size, size=n).tolist() for n in (5, 17, 9, 30)]


@pytest.fixture(scope="module")
def reference(model, prompts):
  """Greedy continuations by full recomputation (no cache), one token at a time."""
  graphdef, params = model
  width = 64  # one fixed-width buffer: causal attention ignores what follows `length`
  forward = jax.jit(lambda p, t, length: nnx.merge(graphdef, p)(t)[0, length - 1])
  out = []
  for prompt in prompts:
    tokens = list(prompt)
    for _ in range(NEW):
      buffer = jnp.asarray([tokens + [0] * (width - len(tokens))])
      tokens.append(int(jnp.argmax(forward(params, buffer, len(tokens)))))
    out.append(tokens[len(prompt):])
  return out


@pytest.fixture(scope="module")
def greedy_left(model, prompts):
  graphdef, params = model
  return Sampler(graphdef, params, eos_ids=[]).sample(prompts, max_new_tokens=NEW)


def test_greedy_with_cache_equals_full_recomputation(greedy_left, reference):
  for i, ref in enumerate(reference):
    assert greedy_left.completion(i) == ref
  assert (greedy_left.lengths == NEW).all() and not greedy_left.stopped.any()


def test_logprobs_equal_a_forward_pass_over_the_generated_sequence(model, prompts, greedy_left):
  graphdef, params = model
  forward = jax.jit(lambda p, t: jax.nn.log_softmax(nnx.merge(graphdef, p)(t)[0], axis=-1))
  for i, prompt in enumerate(prompts):
    full = prompt + greedy_left.completion(i)
    logp = forward(params, jnp.asarray([full + [0] * (64 - len(full))]))  # causal: pad is inert
    expected = [float(logp[len(prompt) - 1 + t, tok])
                for t, tok in enumerate(greedy_left.completion(i))]
    np.testing.assert_allclose(greedy_left.logprobs[i, 0], expected, atol=2e-5)


def test_padding_side_and_batch_composition_do_not_change_greedy_output(model, prompts,
                                                                        greedy_left):
  graphdef, params = model
  right = Sampler(graphdef, params, eos_ids=[], pad_side="right").sample(
      prompts, max_new_tokens=NEW)
  np.testing.assert_array_equal(right.tokens, greedy_left.tokens)
  # Alone (batch 1, a shorter prompt bucket) and among other prompts in another order.
  alone = Sampler(graphdef, params, eos_ids=[]).sample([prompts[0]], max_new_tokens=NEW)
  assert alone.completion(0) == greedy_left.completion(0)
  shuffled = [prompts[3], prompts[1], prompts[0], prompts[2], prompts[1]]
  mixed = Sampler(graphdef, params, eos_ids=[], pad_side="right").sample(
      shuffled, max_new_tokens=NEW)
  for j, i in enumerate([3, 1, 0, 2, 1]):
    assert mixed.completion(j) == greedy_left.completion(i)


def test_top_k_1_and_tiny_top_p_equal_greedy(model, prompts, greedy_left):
  graphdef, params = model
  sampler = Sampler(graphdef, params, eos_ids=[])
  top_k = sampler.sample(prompts, max_new_tokens=NEW, temperature=1.5, top_k=1, seed=3)
  top_p = sampler.sample(prompts, max_new_tokens=NEW, temperature=1.5, top_p=1e-6, seed=4)
  np.testing.assert_array_equal(top_k.tokens, greedy_left.tokens)
  np.testing.assert_array_equal(top_p.tokens, greedy_left.tokens)
  np.testing.assert_allclose(top_k.sampling_logprobs, 0.0, atol=1e-6)  # a one-token support


def test_sampling_is_seeded_and_samples_differ(model, prompts):
  graphdef, params = model
  sampler = Sampler(graphdef, params, eos_ids=[])
  kw = dict(max_new_tokens=NEW, num_samples=3, temperature=1.0, seed=7)
  a, b = sampler.sample(prompts, **kw), sampler.sample(prompts, **kw)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  assert a.tokens.shape == (len(prompts), 3, NEW)
  assert len({tuple(a.completion(0, s)) for s in range(3)}) == 3
  # Plain temperature-1 sampling samples from the model's distribution itself.
  np.testing.assert_allclose(a.sampling_logprobs, a.logprobs, atol=1e-5)


def test_stops_at_eos_and_stop_strings(model, prompts, greedy_left, tokenizer):
  graphdef, params = model
  eos = greedy_left.completion(1)[3]
  first = greedy_left.completion(1).index(eos)
  out = Sampler(graphdef, params, eos_ids=[eos]).sample([prompts[1]], max_new_tokens=NEW)
  assert out.completion(0) == greedy_left.completion(1)[:first + 1]
  assert out.stopped[0, 0] and out.lengths[0, 0] == first + 1
  assert (out.tokens[0, 0, first + 1:] == 0).all() and (out.logprobs[0, 0, first + 1:] == 0).all()

  sampler = Sampler(graphdef, params, tokenizer, eos_ids=[])
  full = sampler.sample([prompts[2]], max_new_tokens=NEW)
  text = full.texts[0][0]
  stop = text[len(text) // 2:len(text) // 2 + 2]
  cut = sampler.sample([prompts[2]], max_new_tokens=NEW, stop_strings=[stop])
  assert cut.texts[0][0] == text[:text.index(stop)] and cut.stopped[0, 0]
  ids = cut.completion(0)
  assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])


def test_chunks_larger_than_max_batch(model, prompts, greedy_left):
  graphdef, params = model
  out = Sampler(graphdef, params, eos_ids=[], max_batch=2).sample(prompts, max_new_tokens=NEW)
  np.testing.assert_array_equal(out.tokens, greedy_left.tokens)


def test_bad_requests(model):
  graphdef, params = model
  sampler = Sampler(graphdef, params, eos_ids=[])
  with pytest.raises(ConfigError, match="empty"):
    sampler.sample([[5], []], max_new_tokens=4)
  with pytest.raises(ConfigError, match="top_p"):
    sampler.sample([[5]], max_new_tokens=4, top_p=0.0)
  with pytest.raises(ConfigError, match="longer than the largest prompt bucket"):
    Sampler(graphdef, params, prompt_buckets=(8,)).sample([[5] * 9], max_new_tokens=4)


SAMPLES = 10_000


@pytest.fixture(scope="module")
def sharp_model(model):
  """The model with its output layer doubled: a few tokens carry most of the mass, so top-k
  and top-p cut where it shows (the plain model spreads 0.7 of its mass over ~80 tokens)."""
  graphdef, params = model
  double = lambda path, x: x * 2 if "lm_head" in jax.tree_util.keystr(path) else x
  return graphdef, jax.tree_util.tree_map_with_path(double, params)


def truncated_distribution(logits: np.ndarray, temperature: float, top_k: int,
                           top_p: float) -> np.ndarray:
  """What top-k then top-p sampling draws from, by their definitions, in float64."""
  x = logits.astype(np.float64) / temperature
  probs = np.exp(x - x.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")
  kept = order[:top_k] if top_k else order
  q = probs[kept] / probs[kept].sum()
  if top_p < 1:
    # The nucleus: the fewest most-probable tokens whose mass reaches top_p. Float32 logits
    # must not be able to move the cut: no cumulative mass within 1e-3 of top_p.
    cum = np.cumsum(q)
    assert np.abs(cum - top_p).min() > 1e-3
    n = int(np.searchsorted(cum, top_p)) + 1
    kept, q = kept[:n], q[:n] / cum[n - 1]
  out = np.zeros_like(probs)
  out[kept] = q
  return out


@pytest.mark.parametrize("temperature,top_k,top_p,support", [
    (1.0, 3, 1.0, 3),
    (1.0, 0, 0.7, 7),
    # top-p applies to the renormalized top-k distribution of the tempered logits: here
    # top-k alone keeps 6 tokens, top-p alone 12, both at temperature 1 keep 3.
    (1.2, 6, 0.7, 4),
])
def test_top_k_top_p_sample_the_truncated_distribution(sharp_model, prompts, temperature,
                                                       top_k, top_p, support):
  graphdef, params = sharp_model
  prompt = prompts[2]
  logits = np.asarray(nnx.merge(graphdef, params)(jnp.asarray([prompt]))[0, -1])
  expected = truncated_distribution(logits, temperature, top_k, top_p)
  allowed = expected > 0
  assert allowed.sum() == support  # no case degenerates to one token or to the whole vocab
  out = Sampler(graphdef, params, eos_ids=[]).sample(
      [prompt], max_new_tokens=1, num_samples=SAMPLES, temperature=temperature, top_k=top_k,
      top_p=top_p, seed=11)
  tokens = out.tokens[0, :, 0]
  counts = np.bincount(tokens, minlength=MODEL.vocab_size)
  assert counts[~allowed].sum() == 0  # nothing outside the top-k / nucleus, ever
  # Each allowed token's frequency within 5 standard errors sqrt(q (1 - q) / n) of its
  # probability (n = 10^4: +-0.02 at q = 0.3; the least likely allowed token here has
  # q > 0.05, 500 expected draws). A correct sampler misses this with probability < 1e-5,
  # and the seed is fixed; a missing or extra token, or a wrong renormalization, misses it
  # by far.
  freq, q = counts[allowed] / SAMPLES, expected[allowed]
  np.testing.assert_array_less(np.abs(freq - q), 5 * np.sqrt(q * (1 - q) / SAMPLES))
  # Per sample, the reported log-probabilities: of the sampled and of the model distribution.
  np.testing.assert_allclose(out.sampling_logprobs[0, :, 0], np.log(expected[tokens]),
                             atol=1e-4)
  model_logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
  np.testing.assert_allclose(out.logprobs[0, :, 0], model_logp[tokens], atol=1e-4)
