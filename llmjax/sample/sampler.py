"""Batched generation with a KV cache: the engine of evaluation and chat.

One compiled call per batch: prefill every prompt at once, sample the first token, then decode
token by token inside a `jax.lax.while_loop` that ends when every row has stopped or the token
budget is spent. Shapes are static and bucketed (batch rows, prompt length and new-token budget
each rounded up to a bucket), so a workload of many prompts compiles a handful of programs,
not one per prompt. With `num_samples > 1` each prompt is prefilled once and its cache copied
to its samples.

Returned logprobs are those of the model's own distribution (log-softmax of the raw logits,
before temperature, top-k and top-p), which is what policy-gradient methods compare against a
forward pass; `sampling_logprobs` are those of the distribution actually sampled from.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from llmjax.buckets import pow2_at_least
from llmjax.errors import ConfigError
from llmjax.parallel import distributed
from llmjax.sample import kv_cache as kv_lib

PAD_SIDES = ("left", "right")
_MIN_NEW_BUCKET = 16


def _bucket(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= n:
      return b
  raise ConfigError(f"a prompt of {n} tokens is longer than the largest prompt bucket "
                    f"({buckets[-1]}): truncate the prompt or pass larger prompt_buckets")


@dataclasses.dataclass
class SampleOutput:
  """Completions of `n` prompts x `s` samples, prompt-major (`[n, s, ...]`).

  tokens: `[n, s, max_new_tokens]` int32, the generated tokens (the stop token included),
    `pad_id` after `lengths`.
  logprobs: `[n, s, max_new_tokens]` float32, model log-probability of each token (0 after).
  sampling_logprobs: the same under the sampled (temperature/top-k/top-p) distribution.
  lengths: `[n, s]` tokens generated, up to and including a stop token or string.
  stopped: `[n, s]` bool, True when a stop token or string ended the row (False: budget hit).
  texts: `[n][s]` decoded completions without the stop token/string (None without tokenizer).
  """
  tokens: np.ndarray
  logprobs: np.ndarray
  sampling_logprobs: np.ndarray
  lengths: np.ndarray
  stopped: np.ndarray
  texts: list[list[str]] | None = None

  def completion(self, prompt: int, sample: int = 0) -> list[int]:
    """The generated token ids of one (prompt, sample), stop token included."""
    return self.tokens[prompt, sample, :self.lengths[prompt, sample]].tolist()

  def prompts(self, start: int, stop: int) -> "SampleOutput":
    """The completions of prompts `start:stop` only."""
    return SampleOutput(self.tokens[start:stop], self.logprobs[start:stop],
                        self.sampling_logprobs[start:stop], self.lengths[start:stop],
                        self.stopped[start:stop],
                        None if self.texts is None else self.texts[start:stop])


def _top_k_bucket(top_k: int, vocab: int) -> int:
  """The static width of the top-k candidates: a power of two >= top_k (at least 16), so
  top_k values within one bucket share a compiled program."""
  return min(vocab, pow2_at_least(top_k, 16))


def _categorical_first_k(key: jax.Array, x: jax.Array, k: jax.Array) -> jax.Array:
  """`jax.random.categorical(key, x[:, :k])` for a traced `k`, over `x [b, K]` (K >= k).

  Bit-identical to the call on the `[b, k]` slice: categorical is argmax(x + gumbel(key,
  shape)), and (threefry, partitionable: jax's default) element `[i, j]` of a `[b, k]` draw
  is element `i * k + j` of a flat `[b * k]` draw, itself the same element of any longer flat
  draw. So one static-size draw, gathered at `i * k + j`, reproduces the old static-k sampler
  for the same key.
  """
  b, width = x.shape
  flat = jax.random.gumbel(key, (b * width,), x.dtype)
  cols = jnp.arange(width)
  # <= b*K - 1 wherever cols < k; the rest is masked out below.
  gather = jnp.minimum(jnp.arange(b)[:, None] * k + cols[None], b * width - 1)
  scores = jnp.where(cols[None] < k, x + flat[gather], -jnp.inf)
  return jnp.argmax(scores, axis=-1)


def _choose(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array,
            top_k: jax.Array, *, greedy: bool, top_k_bucket: int,
            use_top_p: bool) -> tuple[jax.Array, jax.Array]:
  """(token `[b]`, its log-probability under the sampled distribution `[b]`).

  top_k: traced int32 in `[1, top_k_bucket]`, used when `top_k_bucket > 0` (static; 0 = no
  top-k): the candidates are `lax.top_k(x, top_k_bucket)` with ranks >= top_k masked out.
  """
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[0])
  x = logits / temperature
  idx = None
  if top_k_bucket > 0:
    x, idx = jax.lax.top_k(x, top_k_bucket)  # sorted, ties by index: its first k = top_k(x, k)
    x = jnp.where(jnp.arange(top_k_bucket)[None] < top_k, x, -jnp.inf)
  if use_top_p:
    if idx is None:
      idx = jnp.argsort(-x, axis=-1)
      x = jnp.take_along_axis(x, idx, axis=-1)
    probs = jax.nn.softmax(x, axis=-1)
    # Keep a token when the mass before it is below top_p: the smallest set reaching top_p.
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p
    x = jnp.where(keep, x, -jnp.inf)
  if top_k_bucket > 0:
    choice = _categorical_first_k(key, x, top_k)
  else:
    choice = jax.random.categorical(key, x, axis=-1)
  logp = jnp.take_along_axis(jax.nn.log_softmax(x, axis=-1), choice[:, None], axis=-1)[:, 0]
  token = choice if idx is None else jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), logp


def decode_windows(prompt_len: int, new_bucket: int) -> tuple[int, ...]:
  """Ends (in new tokens) of the decode segments; segment i's cache holds
  `prompt_len + ends[i]` slots, so each step attends over at most that, not the whole budget.

  Each window at least doubles the previous one (in total cache length), so a step reads at
  most ~2x the filled cache while a budget compiles O(log) loop bodies: e.g. prompt 32 with
  512 new tokens -> (16, 64, 256, 512), windows 48, 96, 288, 544 slots.
  """
  ends = [min(new_bucket, _MIN_NEW_BUCKET)]
  while ends[-1] < new_bucket:
    ends.append(min(new_bucket, pow2_at_least(prompt_len + 2 * ends[-1])))
  return tuple(ends)


def _stop_sequence_hit(out: jax.Array, t: jax.Array, stop_seqs: jax.Array) -> jax.Array:
  """`[b]` bool: the tokens generated up to step `t` end with one of `stop_seqs`.

  stop_seqs: `[n, L]` right-aligned token sequences, -1 = nothing there.
  """
  length = stop_seqs.shape[1]
  idx = t - (length - 1) + jnp.arange(length)
  window = out[:, jnp.clip(idx, 0)]  # [b, L]
  match = (stop_seqs[None] == -1) | ((window[:, None] == stop_seqs[None]) & (idx >= 0))
  return jnp.any(jnp.all(match, axis=-1), axis=-1)


class StaticGraphDef:
  """A GraphDef as a jit static argument, hashed once.

  jit hashes its static arguments at every call to find the compiled program, and a
  GraphDef's hash walks the whole module graph (~0.4 ms for a 2-layer model: a few percent
  of a tiny RL step, paid at every rollout). A Sampler wraps its graphdef once; calls with
  the same wrapper hit jit's cache by identity, equal graphdefs from other Samplers by value.
  """

  __slots__ = ("graphdef", "_hash")

  def __init__(self, graphdef: nnx.GraphDef):
    self.graphdef, self._hash = graphdef, hash(graphdef)

  def __hash__(self) -> int:
    return self._hash

  def __eq__(self, other: object) -> bool:
    return (isinstance(other, StaticGraphDef) and self._hash == other._hash
            and (self.graphdef is other.graphdef or self.graphdef == other.graphdef))


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples", "new_bucket", "greedy",
                                             "top_k_bucket", "use_top_p", "pad_id"))
def _generate(graphdef, params, prompts, valid, positions, last_idx, next_slot, prompt_lens,
              stop_ids, stop_seqs, seed, chunk_start, temperature, top_p, top_k, max_new, *,
              num_samples, new_bucket, greedy, top_k_bucket, use_top_p, pad_id):
  """Prefill `prompts [rows, P]`, then decode up to `max_new` (<= new_bucket) tokens each.

  `graphdef` is a StaticGraphDef. `params` is a traced argument (never a closed-over constant): new parameter values of the
  same shapes and shardings reuse the compiled program, as RL rollouts need every step.
  """
  model = nnx.merge(graphdef.graphdef, params)
  rows, prompt_len = prompts.shape
  windows = decode_windows(prompt_len, new_bucket)
  cache = kv_lib.init_cache(model.config, rows, prompt_len + windows[0])
  hidden, cache = model.decode(prompts, positions, valid, cache)
  last = jnp.take_along_axis(hidden, last_idx[:, None, None], axis=1)  # [rows, 1, d]
  logits = model.logits(last)[:, 0]
  cache = kv_lib.repeat_rows(cache._replace(index=next_slot), num_samples)
  logits = jnp.repeat(logits, num_samples, axis=0)
  pos = jnp.repeat(prompt_lens, num_samples, axis=0)
  batch = rows * num_samples
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, top_k=top_k,
                             greedy=greedy, top_k_bucket=top_k_bucket, use_top_p=use_top_p)

  def emit(t, logits, key, out, lps, slps, done, lengths):
    token, slp = choose(logits, key)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, pad_id, token)
    out = out.at[:, t].set(token)
    lps = lps.at[:, t].set(jnp.where(done, 0.0, lp))
    slps = slps.at[:, t].set(jnp.where(done, 0.0, slp))
    lengths = lengths + (~done).astype(jnp.int32)
    hit = jnp.any(token[:, None] == stop_ids[None], axis=-1)
    if stop_seqs.shape[0]:
      hit |= _stop_sequence_hit(out, t, stop_seqs)
    return token, out, lps, slps, done | hit, lengths

  # The key is made inside the program: two fewer dispatches per call (RL rollouts call often).
  keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), chunk_start), new_bucket)
  out = jnp.full((batch, new_bucket), pad_id, jnp.int32)
  zeros = jnp.zeros((batch, new_bucket), jnp.float32)
  token, out, lps, slps, done, lengths = emit(
      0, logits, keys[0], out, zeros, zeros, jnp.zeros((batch,), jnp.bool_),
      jnp.zeros((batch,), jnp.int32))

  def body(state):
    t, token, pos, cache, out, lps, done, lengths, slps = state
    hidden, cache = model.decode(token[:, None], pos[:, None], jnp.ones((batch, 1), jnp.bool_),
                                 cache)
    logits = model.logits(hidden)[:, 0]
    token, out, lps, slps, done, lengths = emit(t, logits, keys[t], out, lps, slps, done,
                                                lengths)
    return t + 1, token, pos + 1, cache, out, lps, done, lengths, slps

  state = (jnp.int32(1), token, pos, cache, out, lps, done, lengths, slps)
  for end in windows:
    # Step t writes slot <= prompt_len + t - 1 < prompt_len + end: the window holds every
    # slot this segment fills, and attention (whose cost is the cache length) reads no more.
    state = state[:3] + (kv_lib.grow(state[3], prompt_len + end),) + state[4:]

    def cond(state, end=end):
      t, done = state[0], state[6]
      return (t < jnp.minimum(max_new, end)) & ~jnp.all(done)
    state = jax.lax.while_loop(cond, body, state)
  _, _, _, _, out, lps, done, lengths, slps = state
  return out, lps, slps, lengths, done


class Sampler:
  """Generates from one model; compiles once per (batch, prompt, budget) bucket.

  Args:
    graphdef, params: the model (`nnx.split`); params may be sharded, they are used in place.
    tokenizer: optional; gives `texts`, stop strings and the default eos/pad ids.
    eos_ids: token ids that end a completion (default: the tokenizer's eos).
    pad_id: filler for finished rows and padding (default: the tokenizer's pad, else 0).
    prompt_buckets: allowed padded prompt lengths (default powers of two, 16 up to
      the model's max_seq_len).
    max_batch: rows (prompts x samples) per compiled call; more are run in chunks.
    pad_side: 'left' (every row decodes into the same cache slot) or 'right' (each row
      continues right after its own prompt). Outputs are the same either way.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: Any, tokenizer: Any = None, *,
               eos_ids: Sequence[int] | None = None, pad_id: int | None = None,
               prompt_buckets: Sequence[int] | None = None, max_batch: int = 256,
               pad_side: str = "left"):
    if pad_side not in PAD_SIDES:
      raise ConfigError(f"pad_side={pad_side!r}: use one of {PAD_SIDES}")
    from llmjax.model.reward import refuse_generation
    config = nnx.merge(graphdef, params).config  # merge: a view, no copy
    refuse_generation(config)
    self.vocab_size = config.vocab_size
    self.graphdef, self.params, self.tokenizer = graphdef, params, tokenizer
    self._static_graphdef = StaticGraphDef(graphdef)
    if eos_ids is None:
      eos = getattr(tokenizer, "eos_id", -1) if tokenizer is not None else -1
      eos_ids = [eos] if eos is not None and eos >= 0 else []
    self.eos_ids = [int(i) for i in eos_ids]
    if pad_id is None:
      pad = getattr(tokenizer, "pad_id", -1) if tokenizer is not None else -1
      pad_id = pad if pad is not None and pad >= 0 else 0
    self.pad_id = int(pad_id)
    self.prompt_buckets = tuple(sorted(prompt_buckets or [16 << i for i in range(14)]))
    self.max_batch = max_batch
    self.pad_side = pad_side

  def sample(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             num_samples: int = 1, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             stop_ids: Sequence[int] = (), stop_strings: Sequence[str] = (),
             seed: int = 0, params: Any = None) -> SampleOutput:
    """Completes every prompt `num_samples` times.

    Args:
      prompts: token id lists (unpadded, any lengths).
      temperature: 0 is greedy (then top_k/top_p do not matter).
      top_k: 0 = no limit. top_p: 1.0 = no limit.
      stop_ids: extra stop token ids besides `eos_ids`.
      stop_strings: stop once the decoded completion contains one (needs a tokenizer).
      seed: the same seed and inputs give the same samples.
      params: parameters to sample from instead of the constructor's (same tree structure,
        shapes, dtypes and shardings: then no recompilation), e.g. the current policy of an
        RL step.
    """
    params = self.params if params is None else params
    self._check(prompts, max_new_tokens, num_samples, temperature, top_k, top_p, stop_strings)
    n = len(prompts)
    per_call = max(1, self.max_batch // num_samples)
    stop = np.asarray(sorted(set(self.eos_ids) | {int(i) for i in stop_ids}) or [-1], np.int32)
    seqs = self._stop_sequences(stop_strings)
    new_bucket = pow2_at_least(max_new_tokens, _MIN_NEW_BUCKET)
    greedy = temperature <= 0
    # top_k is traced; only its bucket (the static width of the candidate set) is compiled in.
    vocab = self.vocab_size
    k_bucket = 0 if greedy or top_k == 0 else _top_k_bucket(top_k, vocab)
    outs = []
    for start in range(0, n, per_call):
      chunk = [list(p) for p in prompts[start:start + per_call]]
      arrays = self._layout(chunk, per_call)
      res = _generate(
          # numpy arguments: jit moves them in one go (a jnp array each is a dispatch each).
          self._static_graphdef, params, *arrays, stop, seqs,
          np.uint32(seed), np.int32(start), np.float32(max(temperature, 1e-6)),
          np.float32(top_p), np.int32(min(top_k, vocab) if k_bucket else 0),
          np.int32(max_new_tokens), num_samples=num_samples, new_bucket=new_bucket,
          greedy=greedy, top_k_bucket=k_bucket, use_top_p=not greedy and top_p < 1.0,
          pad_id=self.pad_id)
      res = _to_host(res)
      keep = len(chunk) * num_samples
      outs.append([np.asarray(r)[:keep].reshape((len(chunk), num_samples) + r.shape[1:])
                   for r in res])
    tokens, lps, slps, lengths, stopped = (np.concatenate([o[i] for o in outs])
                                           for i in range(5))
    tokens, lps, slps = (a[..., :max_new_tokens] for a in (tokens, lps, slps))
    out = SampleOutput(tokens, lps, slps, lengths, stopped)
    if stop_strings:
      self._apply_stop_strings(out, stop_strings)
    if self.tokenizer is not None:
      stops = {int(i) for i in stop}
      out.texts = [[self._text(out, i, j, stops, stop_strings) for j in range(num_samples)]
                   for i in range(n)]
    return out

  def _check(self, prompts, max_new_tokens, num_samples, temperature, top_k, top_p,
             stop_strings) -> None:
    if not prompts:
      raise ConfigError("sample() needs at least one prompt")
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
      raise ConfigError(f"prompts {empty[:5]} are empty: start each with at least one token "
                        "(e.g. bos)")
    for name, value, ok in (("max_new_tokens", max_new_tokens, max_new_tokens >= 1),
                            ("num_samples", num_samples, num_samples >= 1),
                            ("temperature", temperature, temperature >= 0),
                            ("top_k", top_k, top_k >= 0),
                            ("top_p", top_p, 0 < top_p <= 1)):
      if not ok:
        raise ConfigError(f"sample(): {name}={value} is out of range")
    if stop_strings and self.tokenizer is None:
      raise ConfigError("stop_strings need a tokenizer: pass one to Sampler(...)")

  def _layout(self, chunk: list[list[int]], per_call: int):
    """Pads prompts into `[rows, bucket]` arrays on the configured side."""
    rows = min(pow2_at_least(len(chunk)), pow2_at_least(per_call))
    chunk = chunk + [chunk[0]] * (rows - len(chunk))  # filler rows: a real prompt, discarded
    width = _bucket(max(len(p) for p in chunk), self.prompt_buckets)
    tokens = np.full((rows, width), self.pad_id, np.int32)
    valid = np.zeros((rows, width), np.bool_)
    positions = np.zeros((rows, width), np.int32)
    lens = np.asarray([len(p) for p in chunk], np.int32)
    for i, p in enumerate(chunk):
      cols = slice(width - len(p), width) if self.pad_side == "left" else slice(0, len(p))
      tokens[i, cols], valid[i, cols], positions[i, cols] = p, True, np.arange(len(p))
    if self.pad_side == "left":
      last_idx, next_slot = np.full(rows, width - 1, np.int32), np.full(rows, width, np.int32)
    else:
      last_idx, next_slot = lens - 1, lens
    return tokens, valid, positions, last_idx, next_slot, lens

  def _stop_sequences(self, stop_strings: Sequence[str]) -> np.ndarray:
    """Token sequences of the stop strings, right-aligned `[n, L]` (-1 = none).

    They end the decode loop early; the decoded-text check afterwards catches stop strings
    that tokenize differently in context.
    """
    seqs = [self.tokenizer.encode(s) for s in stop_strings if s]
    seqs = [s for s in seqs if s]
    if not seqs:
      return np.zeros((0, 1), np.int32)
    width = max(len(s) for s in seqs)
    out = np.full((len(seqs), width), -1, np.int32)
    for i, s in enumerate(seqs):
      out[i, width - len(s):] = s
    return out

  def _apply_stop_strings(self, out: SampleOutput, stop_strings: Sequence[str]) -> None:
    """Cuts each completion after the first token whose text completes a stop string."""
    for i in range(out.tokens.shape[0]):
      for j in range(out.tokens.shape[1]):
        ids = out.tokens[i, j, :out.lengths[i, j]].tolist()
        if not any(s in self.tokenizer.decode(ids) for s in stop_strings):
          continue
        lo, hi = 1, len(ids)  # the shortest prefix containing a stop string
        while lo < hi:
          mid = (lo + hi) // 2
          if any(s in self.tokenizer.decode(ids[:mid]) for s in stop_strings):
            hi = mid
          else:
            lo = mid + 1
        out.tokens[i, j, lo:] = self.pad_id
        out.logprobs[i, j, lo:] = 0.0
        out.sampling_logprobs[i, j, lo:] = 0.0
        out.lengths[i, j], out.stopped[i, j] = lo, True

  def _text(self, out: SampleOutput, i: int, j: int, stop_ids: set[int],
            stop_strings: Sequence[str]) -> str:
    ids = out.completion(i, j)
    if out.stopped[i, j] and ids and ids[-1] in stop_ids:
      ids = ids[:-1]
    text = self.tokenizer.decode(ids)
    for s in stop_strings:
      if s and s in text:
        text = text[:text.index(s)]
    return text


def _to_host(arrays):
  """A computation's outputs as numpy on this process, also when they span several processes
  (params sharded over every host's devices)."""
  if jax.process_count() == 1:
    return jax.device_get(arrays)
  return multihost_utils.process_allgather(arrays, tiled=True)


def sample_per_process(sampler: Sampler, prompts: Sequence[Sequence[int]],
                       **kwargs: Any) -> SampleOutput:
  """`sampler.sample` when every process has prompts of its own (RL rollouts, evals).

  Each process passes as many prompts; each gets the completions of its own. Underneath, one
  sampling program runs over all processes' prompts at once (gathered, process-major), as the
  parameters are sharded over all processes' devices; the same seed on every process gives
  every process the same samples, so the result equals one process sampling the gathered
  prompts. One process: `sampler.sample(prompts, **kwargs)`.
  """
  if jax.process_count() == 1:
    return sampler.sample(prompts, **kwargs)
  everyone = distributed.allgather_token_lists(prompts)
  start = jax.process_index() * len(prompts)
  return sampler.sample(everyone, **kwargs).prompts(start, start + len(prompts))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_logprobs(graphdef, params, tokens, positions, segment_ids):
  """`[rows, width - 1]` float32: log p(tokens[:, i + 1] | tokens[:, :i + 1]) by the training
  forward pass (packed-row signature: positions and segment ids, 0 = padding)."""
  logits = nnx.merge(graphdef, params)(tokens, positions, segment_ids)[:, :-1]
  targets = tokens[:, 1:, None]
  picked = jnp.take_along_axis(logits, targets, axis=-1)[..., 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def forward_logprobs(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[Sequence[int]],
                     out: SampleOutput, *, batch_size: int = 64) -> np.ndarray:
  """The generated tokens' log-probs recomputed by the training forward pass.

  Each (prompt, sample) row is prompt + completion (right-padded to a power-of-two width, so
  a workload compiles a few shapes), run through `model(tokens, positions, segment_ids)` in
  chunks of `batch_size` rows. Returns `[n, s, max_new_tokens]` float32 like `out.logprobs`
  (0 past each row's length).
  """
  n, s, new = out.tokens.shape
  rows = [(i, j) for i in range(n) for j in range(s)]
  width = pow2_at_least(max(len(prompts[i]) + int(out.lengths[i, j]) for i, j in rows), 16)
  result = np.zeros((n, s, new), np.float32)
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    positions = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for r, (i, j) in enumerate(chunk):
      seq = list(prompts[i]) + out.completion(i, j)
      tokens[r, :len(seq)], positions[r, :len(seq)], segments[r, :len(seq)] = (
          seq, np.arange(len(seq)), 1)
    logp = np.asarray(_token_logprobs(graphdef, params, jnp.asarray(tokens),
                                      jnp.asarray(positions), jnp.asarray(segments)))
    for r, (i, j) in enumerate(chunk):
      first, length = len(prompts[i]) - 1, int(out.lengths[i, j])  # predicts completion[0]
      result[i, j, :length] = logp[r, first:first + length]
  return result


def logprob_gap(graphdef: nnx.GraphDef, params: Any, prompts: Sequence[Sequence[int]],
                out: SampleOutput, *, batch_size: int = 64) -> float:
  """max |sampler logprob - training-forward logprob| over every generated token.

  The sampler (KV cache, windowed decode) and the training forward pass (full causal
  attention) compute the same distribution in a different order; RL's importance ratios
  assume they agree. Float32 on the tiny model: ~1e-6; bf16 or a sharded model shows how far
  off-policy the rollouts really are. 0.0 when nothing was generated.
  """
  recomputed = forward_logprobs(graphdef, params, prompts, out, batch_size=batch_size)
  generated = np.arange(out.tokens.shape[2]) < out.lengths[..., None]
  if not generated.any():
    return 0.0
  return float(np.abs(out.logprobs - recomputed)[generated].max())
