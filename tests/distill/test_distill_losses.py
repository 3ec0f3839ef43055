"""The distillation losses against the formula in plain numpy and against TRL 1.16's own code."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llmjax.distill import losses
from llmjax.errors import ConfigError
from llmjax.model.config import PRESETS
from llmjax.model.transformer import build_model
from llmjax.train.losses import target_weights, token_cross_entropy

VOCAB = 11


def logits_and_mask(seed=0, b=2, s=5, v=VOCAB, scale=2.0):
  rng = np.random.default_rng(seed)
  student = (scale * rng.standard_normal((b, s, v))).astype(np.float32)
  teacher = (scale * rng.standard_normal((b, s, v))).astype(np.float32)
  mask = np.ones((b, s), np.float32)
  mask[0, :2] = 0  # a prompt
  mask[1, -1] = 0  # padding
  return student, teacher, mask


def softmax64(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max())
  return e / e.sum()


def np_divergence(zs, zt, beta, temperature):
  """One position, from the GKD paper's Eq. 1 with TRL's beta = 0 / 1 cases, times T^2."""
  ps, pt = softmax64(zs / temperature), softmax64(zt / temperature)
  total = 0.0
  for v in range(len(ps)):
    if beta == 0:
      total += pt[v] * np.log(pt[v] / ps[v])
    elif beta == 1:
      total += ps[v] * np.log(ps[v] / pt[v])
    else:
      m = beta * pt[v] + (1 - beta) * ps[v]
      total += beta * pt[v] * np.log(pt[v] / m) + (1 - beta) * ps[v] * np.log(ps[v] / m)
  return temperature ** 2 * total


def np_masked_sum(student, teacher, mask, beta, temperature):
  total = 0.0
  for i in range(mask.shape[0]):
    for j in range(mask.shape[1]):
      if mask[i, j]:
        total += mask[i, j] * np_divergence(student[i, j], teacher[i, j], beta, temperature)
  return total


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_the_formula(beta, temperature):
  student, teacher, mask = logits_and_mask()
  total, count = losses.generalized_jsd(student, teacher, mask, beta=beta,
                                        temperature=temperature)
  np.testing.assert_allclose(total, np_masked_sum(student, teacher, mask, beta, temperature),
                             rtol=1e-5)
  assert count == mask.sum()


def test_beta_ends_are_the_two_kls_and_the_named_functions():
  student, teacher, mask = logits_and_mask(seed=1)
  forward = np_masked_sum(student, teacher, mask, 0.0, 1.0)
  reverse = np_masked_sum(student, teacher, mask, 1.0, 1.0)
  assert abs(forward - reverse) > 0.1 * forward  # the directions differ on these logits
  # By hand: sum_v p_T (log p_T - log p_S) and sum_v p_S (log p_S - log p_T).
  ps = np.apply_along_axis(softmax64, -1, student)
  pt = np.apply_along_axis(softmax64, -1, teacher)
  by_hand_forward = np.sum(mask * np.sum(pt * (np.log(pt) - np.log(ps)), -1))
  by_hand_reverse = np.sum(mask * np.sum(ps * (np.log(ps) - np.log(pt)), -1))
  np.testing.assert_allclose(forward, by_hand_forward, rtol=1e-10)
  np.testing.assert_allclose(reverse, by_hand_reverse, rtol=1e-10)
  for fn, beta, want in ((losses.forward_kl, 0.0, forward), (losses.reverse_kl, 1.0, reverse)):
    np.testing.assert_allclose(fn(student, teacher, mask)[0], want, rtol=1e-5)
    np.testing.assert_allclose(
        losses.generalized_jsd(student, teacher, mask, beta=beta)[0], want, rtol=1e-5)
  # Near the ends the JSD goes to 0 like beta * forward and (1 - beta) * reverse: the same
  # directions TRL's special cases give.
  eps = 1e-3
  near0 = losses.generalized_jsd(student, teacher, mask, beta=eps)[0] / eps
  near1 = losses.generalized_jsd(student, teacher, mask, beta=1 - eps)[0] / eps
  np.testing.assert_allclose(near0, forward, rtol=2e-2)
  np.testing.assert_allclose(near1, reverse, rtol=2e-2)


# TRL 1.16.0, trl/experimental/gkd/gkd_trainer.py, GKDTrainer.generalized_jsd_loss, verbatim
# but for the @staticmethod decorator and the docstring.
TRL_GKD = '''
def generalized_jsd_loss(
    student_logits,
    teacher_logits,
    labels=None,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    num_items_in_batch=None,
):
    # Apply temperature scaling
    student_logits = student_logits / temperature
    teacher_logits = teacher_logits / temperature

    # Compute log probabilities for student and probabilities for teacher
    student_log_probs = F.log_softmax(student_logits, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits, dim=-1)

    if beta == 0:
        jsd = F.kl_div(student_log_probs, teacher_log_probs, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(teacher_log_probs, student_log_probs, reduction="none", log_target=True)
    else:
        # Compute the log of the mixture distribution
        # log(a + b) = log(exp(log(a)) + exp(log(b))) -> for mixture
        beta = torch.tensor(beta, dtype=student_log_probs.dtype, device=student_log_probs.device)
        mixture_log_probs = torch.logsumexp(
            torch.stack([student_log_probs + torch.log1p(-beta), teacher_log_probs + torch.log(beta)]),
            dim=0,
        )

        # Compute KL divergences using F.kl_div
        # PyTorch differs from the standard mathematical definition, so the order of the probability distributions is swapped compared to that defined in the paper.
        kl_teacher = F.kl_div(mixture_log_probs, teacher_log_probs, reduction="none", log_target=True)
        kl_student = F.kl_div(mixture_log_probs, student_log_probs, reduction="none", log_target=True)

        # Compute the Generalized Jensen-Shannon Divergence
        jsd = beta * kl_teacher + (1 - beta) * kl_student

    # Masking
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]

    # Apply reduction
    if num_items_in_batch is not None:
        # Normalize by the global number of valid tokens for gradient-accumulation-correct loss (see issue #4719).
        jsd_sum = jsd.sum()
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(jsd_sum.device)
        return jsd_sum / num_items_in_batch
    if reduction == "batchmean":
        # clamp_min(1) avoids 0/0 -> nan when a sample has no unmasked positions
        # (e.g. completion fully truncated). jsd[mask] is empty -> jsd.sum() == 0,
        # so 0/1 == 0 with a valid grad path.
        denom = mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1)
        return jsd.sum() / denom
    elif reduction == "sum":
        return jsd.sum()
    elif reduction == "mean":
        return jsd.mean()
    else:
        return jsd
'''

# TRL 1.16.0, trl/experimental/server_distillation/server_distillation_trainer.py, verbatim.
TRL_TAIL = '''
def _add_tail_bucket(log_probs, valid_mask):
    log_sum = torch.logsumexp(log_probs, dim=-1, keepdim=True)
    log_sum = torch.clamp(log_sum, max=-1e-7)  # ensure sum < 1
    tail = torch.log(-torch.expm1(log_sum))  # log(1 - exp(log_sum))
    tail_mask = torch.ones_like(valid_mask[..., :1], dtype=torch.bool)
    return torch.cat([log_probs, tail], dim=-1), torch.cat([valid_mask, tail_mask], dim=-1)
'''


def trl_functions():
  torch = pytest.importorskip("torch")
  namespace = {"torch": torch, "F": torch.nn.functional}
  exec(TRL_GKD, namespace)
  exec(TRL_TAIL, namespace)
  return torch, namespace


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_generalized_jsd_matches_trl(beta, temperature):
  torch, trl = trl_functions()
  student, teacher, mask = logits_and_mask(seed=2, v=32)
  labels = np.where(mask > 0, 1, -100)
  want = trl["generalized_jsd_loss"](torch.tensor(student), torch.tensor(teacher),
                                     labels=torch.tensor(labels), beta=beta,
                                     temperature=temperature).item()
  total, count = losses.generalized_jsd(student, teacher, mask, beta=beta,
                                        temperature=temperature)
  # sum / count is TRL's 'batchmean' (a per-token mean); TRL has no T^2 factor.
  np.testing.assert_allclose(total / count / temperature ** 2, want, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_temperature_squared_keeps_the_gradient_scale(beta):
  """d/dz_student at T = 2 against the closed forms in TRL's chunked-divergence kernel (whose
  loss has no T^2, so its gradient carries 1/T where this one carries T)."""
  temperature = 2.0
  student, teacher, mask = logits_and_mask(seed=3)
  grad = jax.grad(lambda s: losses.generalized_jsd(s, teacher, mask, beta=beta,
                                                   temperature=temperature)[0])(student)
  ps = np.apply_along_axis(softmax64, -1, student / temperature)
  pt = np.apply_along_axis(softmax64, -1, teacher / temperature)
  log_ps, log_pt = np.log(ps), np.log(pt)
  if beta == 0:
    per_logit = ps - pt
  elif beta == 1:
    kl = np.sum(ps * (log_ps - log_pt), -1, keepdims=True)
    per_logit = ps * (log_ps - log_pt - kl)
  else:
    log_m = np.log(beta * pt + (1 - beta) * ps)
    kl_student_m = np.sum(ps * (log_ps - log_m), -1, keepdims=True)
    per_logit = (1 - beta) * ps * (log_ps - log_m - kl_student_m)
  want = temperature * per_logit * mask[..., None]  # T^2 * (1/T)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-7)
  assert np.abs(grad).max() > 1e-2


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_masked_positions_do_not_count(beta):
  student, teacher, mask = logits_and_mask(seed=4)
  fn = lambda s, t: losses.generalized_jsd(s, t, mask, beta=beta, temperature=1.5)
  rng = np.random.default_rng(5)
  off = (mask == 0)[..., None]
  student2 = np.where(off, 50 * rng.standard_normal(student.shape), student).astype(np.float32)
  teacher2 = np.where(off, 50 * rng.standard_normal(teacher.shape), teacher).astype(np.float32)
  (a, n), (b, m) = fn(student, teacher), fn(student2, teacher2)
  np.testing.assert_allclose(a, b, rtol=1e-6)
  assert n == m == mask.sum()
  grad = jax.grad(lambda s: fn(s, teacher2)[0])(student2)
  assert np.all(np.asarray(grad)[mask == 0] == 0)
  assert np.abs(np.asarray(grad)[mask == 1]).max() > 1e-3


@pytest.mark.parametrize("tail", [True, False])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_top_k_with_the_whole_vocabulary_is_the_full_loss(tail, beta):
  student, teacher, mask = logits_and_mask(seed=6)
  full = losses.generalized_jsd(student, teacher, mask, beta=beta, temperature=2.0)[0]
  for k in (VOCAB, VOCAB + 5):
    top = losses.generalized_jsd(student, teacher, mask, beta=beta, temperature=2.0, top_k=k,
                                 top_k_tail=tail)[0]
    np.testing.assert_allclose(top, full, rtol=1e-5, atol=1e-5)
  smaller = losses.generalized_jsd(student, teacher, mask, beta=beta, temperature=2.0, top_k=3,
                                   top_k_tail=tail)[0]
  assert abs(smaller - full) > 1e-3  # k < vocab really drops tokens


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tail", [True, False])
def test_top_k_matches_trl_server_distillation(beta, tail):
  """TRL's sparse path: teacher top-k log-probs, the student's at the same ids, then the tail
  bucket (`loss_add_tail=True`) or renormalization over the k ids."""
  torch, trl = trl_functions()
  k = 3
  student, teacher, mask = logits_and_mask(seed=7)
  s_lp = torch.log_softmax(torch.tensor(student, dtype=torch.float64), -1)
  t_lp = torch.log_softmax(torch.tensor(teacher, dtype=torch.float64), -1)
  t_top, ids = torch.topk(t_lp, k, dim=-1)
  s_top = s_lp.gather(-1, ids)
  valid = torch.ones_like(ids, dtype=torch.bool)
  if tail:
    s_sparse, t_sparse = trl["_add_tail_bucket"](s_top, valid)[0], trl["_add_tail_bucket"](
        t_top, valid)[0]
  else:
    s_sparse = s_top - torch.logsumexp(s_top, -1, keepdim=True)
    t_sparse = t_top - torch.logsumexp(t_top, -1, keepdim=True)
  # GKD's function re-applies log_softmax, a no-op on these normalized log-probs.
  labels = torch.tensor(np.where(mask > 0, 1, -100))
  want = trl["generalized_jsd_loss"](s_sparse, t_sparse, labels=labels, beta=beta).item()
  total, count = losses.generalized_jsd(student, teacher, mask, beta=beta, top_k=k,
                                        top_k_tail=tail)
  np.testing.assert_allclose(total / count, want, rtol=1e-5)


# Student and teacher share the vocabulary, not the shape.
STUDENT = dataclasses.replace(PRESETS["tiny"], vocab_size=96, d_model=32, d_ff=64, n_heads=2,
                              n_kv_heads=1, n_layers=2)
TEACHER = dataclasses.replace(STUDENT, d_model=48, d_ff=80, n_heads=4, n_kv_heads=2, n_layers=1)


def packed_batch(b=2, s=16, vocab=96, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, vocab, (b, s))
  segment_ids = np.ones((b, s), np.int32)
  segment_ids[0, 9:] = 2  # two documents in row 0
  segment_ids[1, 13:] = 0  # padding at the end of row 1
  positions = np.where(segment_ids[0] == 2, np.arange(s) - 9, np.arange(s))
  positions = np.stack([positions, np.arange(s)])
  loss_mask = np.ones((b, s), np.int32)
  loss_mask[1, :4] = 0  # a prompt
  targets = np.roll(tokens, -1, axis=1)
  return {k: jnp.asarray(v) for k, v in dict(
      tokens=tokens, targets=targets, positions=positions, segment_ids=segment_ids,
      loss_mask=loss_mask).items()}


@pytest.fixture(scope="module")
def models():
  return build_model(STUDENT, seed=1), build_model(TEACHER, seed=2)


def loss_and_grads(student, teacher, batch, chunk_size, **kw):
  graphdef, params = nnx.split(student)

  def fn(p):
    loss, count, aux = losses.distill_loss(nnx.merge(graphdef, p), teacher, batch,
                                           chunk_size=chunk_size, **kw)
    return loss, (count, aux)
  (loss, (count, aux)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  return loss, count, aux, grads


def test_distill_loss_is_the_mix_of_ce_and_jsd(models):
  student, teacher = models
  batch = packed_batch()

  @nnx.jit
  def both(student, teacher):
    out = losses.distill_loss(student, teacher, batch, beta=0.5, temperature=2.0, alpha=0.3)
    args = (batch["tokens"], batch["positions"], batch["segment_ids"])
    s_logits, t_logits = student(*args), teacher(*args)
    w = target_weights(batch)
    return out, (losses.generalized_jsd(s_logits, t_logits, w, beta=0.5, temperature=2.0)[0],
                 token_cross_entropy(s_logits, batch["targets"], w)[0],
                 token_cross_entropy(t_logits, batch["targets"], w)[0])
  (loss, count, aux), (jsd, ce, teacher_ce) = both(student, teacher)
  assert count == 2 * 16 - 3 - 4  # padding and prompt positions are not trained
  np.testing.assert_allclose(loss, 0.3 * ce + 0.7 * jsd, rtol=1e-5)
  for name, want in (("jsd", jsd), ("ce", ce), ("teacher_ce", teacher_ce)):
    np.testing.assert_allclose(aux[name][0], want, rtol=1e-5)
    assert aux[name][1] == count
  assert jsd > 0 and abs(ce - teacher_ce) > 1e-3


def test_sampled_rows_get_no_ce(models):
  # Row 1 marked sampled (on-policy): the CE term and metrics count row 0 alone, the
  # divergence both rows, and the loss is alpha * CE(row 0) + (1 - alpha) * JSD(both).
  student, teacher = models
  batch = packed_batch()
  kw = dict(beta=0.5, temperature=1.0, alpha=0.4, chunk_size=8)
  row0 = dict(batch, loss_mask=batch["loss_mask"].at[1].set(0))

  @nnx.jit
  def three(student, teacher):
    return (losses.distill_loss(student, teacher, batch, reference_rows=jnp.asarray([1.0, 0.0]),
                                **kw),
            losses.distill_loss(student, teacher, batch, **kw),
            losses.distill_loss(student, teacher, row0, **kw))
  (loss, count, aux), (_, _, whole), (_, count0, aux0) = three(student, teacher)
  assert count == whole["jsd"][1] and aux["ce"][1] == count0 < count
  np.testing.assert_allclose(aux["ce"][0], aux0["ce"][0], rtol=1e-6)
  np.testing.assert_allclose(aux["teacher_ce"][0], aux0["teacher_ce"][0], rtol=1e-6)
  np.testing.assert_allclose(aux["jsd"][0], whole["jsd"][0], rtol=1e-6)
  np.testing.assert_allclose(loss, 0.4 * aux0["ce"][0] + 0.6 * whole["jsd"][0], rtol=1e-5)


def test_chunked_equals_unchunked(models):
  student, teacher = models
  batch = packed_batch(seed=1)
  kw = dict(beta=0.3, temperature=1.5, alpha=0.25)
  loss, count, aux, grads = loss_and_grads(student, teacher, batch, 0, **kw)
  c_loss, c_count, c_aux, c_grads = loss_and_grads(student, teacher, batch, 4, **kw)
  np.testing.assert_allclose(c_loss, loss, rtol=1e-5)
  assert c_count == count
  for name in aux:
    np.testing.assert_allclose(c_aux[name][0], aux[name][0], rtol=1e-5)
  flat, c_flat = jax.tree.leaves(grads), jax.tree.leaves(c_grads)
  assert len(flat) == len(c_flat) > 0
  for g, c in zip(flat, c_flat):
    np.testing.assert_allclose(c, g, rtol=1e-5, atol=1e-7)
  assert max(float(jnp.abs(g).max()) for g in flat) > 1e-4


def test_chunked_path_never_holds_full_length_logits(models):
  """The traced loss and gradient (scan bodies included) have `[2, 4, vocab]` logits only."""
  student, teacher = models
  batch = packed_batch()
  graphdef, params = nnx.split(student)
  full, chunk = "f32[2,16,96]", "f32[2,4,96]"  # no other array in these models has 96 columns
  for chunk_size, has_full in ((0, True), (4, False)):
    fn = lambda p: losses.distill_loss(nnx.merge(graphdef, p), teacher, batch, beta=0.5,
                                       chunk_size=chunk_size, top_k=5)[0]
    text = str(jax.make_jaxpr(jax.grad(fn))(params))
    assert (full in text) == has_full and (chunk in text) != has_full


def test_bad_settings_raise_config_error(models):
  student, teacher = models
  student_logits, teacher_logits, mask = logits_and_mask()
  for kw in (dict(beta=1.5), dict(beta=0.5, temperature=0.0), dict(beta=0.5, top_k=-1)):
    with pytest.raises(ConfigError):
      losses.generalized_jsd(student_logits, teacher_logits, mask, **kw)
  batch = packed_batch()
  with pytest.raises(ConfigError, match="alpha"):
    losses.distill_loss(student, teacher, batch, beta=0.5, alpha=2.0)
  with pytest.raises(ConfigError, match="chunk_size"):
    losses.distill_loss(student, teacher, batch, beta=0.5, chunk_size=5)
  other = build_model(dataclasses.replace(TEACHER, vocab_size=64))
  with pytest.raises(ConfigError, match="vocabulary"):
    losses.distill_loss(student, other, batch, beta=0.5)
