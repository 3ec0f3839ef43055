"""The rm and dpo stages end to end on a tiny model: exact resume, precomputed == live
reference (and chunked log-probs == whole), the reward model's HF export scores, LoRA, and
bad settings."""

import dataclasses

import jax
import numpy as np
import pytest

from llmjax.data import instructions, preferences
from llmjax.errors import ConfigError
from llmjax.metrics import read_metrics
from llmjax.model.lora import LoraConfig
from llmjax.preference import logps as logps_lib
from llmjax.preference.on_policy import OnPolicyPairs
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.dpo import PreferenceLoss, dpo_stage
from llmjax.stages.reward_model import reward_model_stage
from llmjax.stages.sft import SFT
from llmjax.train import loop
from llmjax.train.losses import token_stats
from llmjax.train.optimizer import OptimizerConfig

from tests.conftest import TEST_MODEL

DATA = preferences.PreferenceDataConfig(seq_len=128, batch_size=4, max_pairs_per_row=2,
                                        builtin_train=64, builtin_eval=12, eval_batches=1)
ON_POLICY = OnPolicyPairs(samples=3, max_new_tokens=6, eval_questions=8, seed=5)


def _train(steps=4, every=2):
  return loop.TrainConfig(total_steps=steps, log_every=1, eval_every=steps,
                          checkpoint_every=every)


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer_path):
  """A few SFT steps from a random init: the model the preference stages start from."""
  workdir = str(tmp_path_factory.mktemp("sft_start"))
  sft = SFT(model=TEST_MODEL,
            data=instructions.SFTDataConfig(seq_len=64, batch_size=4, builtin_train=64,
                                            builtin_eval=8, eval_batches=1),
            train=loop.TrainConfig(total_steps=3, log_every=1, eval_every=3,
                                   checkpoint_every=3),
            optimizer=OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
            tokenizer=TokenizerConfig(path=tokenizer_path), eval_questions=0)
  run_stages([sft], RunContext(workdir=workdir))
  return workdir


def dpo(start_dir, tokenizer_path, **kw):
  args = dict(model=TEST_MODEL, data=DATA, train=_train(),
              optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
              tokenizer=TokenizerConfig(path=tokenizer_path), init_from=start_dir,
              eval_questions=4, eval_max_new_tokens=4)
  args.update(kw)
  return dpo_stage(**args)


def rm(start_dir, tokenizer_path, **kw):
  args = dict(model=TEST_MODEL, data=DATA, train=_train(),
              optimizer=OptimizerConfig(learning_rate=1e-3, warmup_steps=1),
              tokenizer=TokenizerConfig(path=tokenizer_path), init_from=start_dir,
              center_rewards_coefficient=0.01)
  args.update(kw)
  return reward_model_stage(**args)


def run(workdir, stage, stop_after=None):
  ctx = run_stages([stage], RunContext(workdir=str(workdir), stop_after=stop_after))
  return ctx, [np.asarray(x) for x in jax.tree.leaves(jax.device_get(
      ctx.outputs[stage.name].params))]


def train_rows(workdir, stage):
  return [m for m in read_metrics(str(workdir)) if m["kind"] == "train" and m["stage"] == stage]


# The live reference is covered by test_precomputed_reference_equals_live.
# rm with on-policy pairs (the plain rm's path and more): the resumed run samples its start's
# answers again and must get the same pairs.
@pytest.mark.parametrize("which", ["dpo_precomputed", "rm_on_policy"])
def test_resume_is_exact(tmp_path, start, tokenizer_path, which):
  make = {"dpo": lambda: dpo(start, tokenizer_path),
          "dpo_precomputed": lambda: dpo(start, tokenizer_path, precompute_reference=True),
          "rm": lambda: rm(start, tokenizer_path),
          "rm_on_policy": lambda: rm(start, tokenizer_path, on_policy=ON_POLICY)}[which]
  _, expected = run(tmp_path / "straight", make())
  _, stopped = run(tmp_path / "resumed", make(), stop_after=2)
  table = tmp_path / "resumed" / "reference_logps" / "dpo.npz"
  if which == "dpo_precomputed":
    before = table.stat().st_mtime_ns
  _, resumed = run(tmp_path / "resumed", make())
  assert len(resumed) == len(expected)
  for a, b in zip(resumed, expected):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(stopped, expected))  # it did train on
  if which == "dpo_precomputed":
    assert table.stat().st_mtime_ns == before  # read back, not recomputed
  name = "dpo" if which.startswith("dpo") else "rm"
  rows = train_rows(tmp_path / "straight", name)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  key = "accuracy" if name == "rm" else "rewards/accuracies"
  assert all(0.0 <= r[key] <= 1.0 and np.isfinite(r["loss"]) for r in rows)
  if which == "rm_on_policy":
    check_on_policy_pairs(tmp_path / "straight", start)


def check_on_policy_pairs(workdir, start):
  """The rm stage's on-policy counts are its start's own sampled answers, sampled here again
  and judged by plain normalised string equality; every on-policy held-out pair evaluated."""
  from llmjax.data import chat
  from llmjax.runs.load import load_run
  from llmjax.sample.sampler import Sampler
  records = read_metrics(str(workdir))
  data = next(m for m in records if m["kind"] == "data" and m["stage"] == "rm")
  loaded = load_run(start)
  tok = loaded.tokenizer
  sampler = Sampler(loaded.graphdef, loaded.params, tok,
                    eos_ids=chat.stop_token_ids(tok, "chatml"))
  norm = lambda t: t.strip().rstrip(".").strip().lower()
  for split, pairs in (("train", preferences.builtin_pairs("train", 64)),
                       ("eval", preferences.builtin_pairs("eval", 12)[:8])):
    out = sampler.sample([chat.prompt_ids(p["prompt"], "chatml", tok) for p in pairs],
                         max_new_tokens=6, num_samples=3, temperature=1.0, seed=5)
    answers = [p["chosen"][0]["content"] for p in pairs]
    wrong = [{t for t in texts if norm(t) != norm(a)} for a, texts in zip(answers, out.texts)]
    right = sum(norm(t) == norm(a) for a, texts in zip(answers, out.texts) for t in texts)
    assert data[f"on_policy_{split}_samples"] == 3 * len(pairs)
    assert data[f"on_policy_{split}_correct"] == right
    assert data[f"on_policy_{split}_pairs"] == sum(len(w) for w in wrong) > 0
  evals = [m for m in records if m["kind"] == "eval" and m["stage"] == "rm"]
  assert evals[-1]["on_policy/pairs"] == data["on_policy_eval_pairs"]
  assert 0.0 <= evals[-1]["on_policy/accuracy"] <= 1.0


def test_precomputed_reference_equals_live(tmp_path, start, tokenizer_path, monkeypatch):
  # The precomputed run also chunks its log-probs (TrainConfig.loss_chunk_size: 128 positions
  # in 48s, the last padded), in the reference pass and the loss: the same numbers.
  chunks = []

  def spy(model, hidden, targets, chunk_size=0, **kw):
    chunks.append(chunk_size)
    return token_stats(model, hidden, targets, chunk_size, **kw)
  monkeypatch.setattr(logps_lib, "token_stats", spy)
  stage = lambda pre: dpo(start, tokenizer_path, precompute_reference=pre,
                          train=dataclasses.replace(_train(steps=2, every=2),
                                                    loss_chunk_size=48 if pre else 0))
  run(tmp_path / "live", stage(False))
  assert chunks and set(chunks) == {0}
  chunks.clear()
  run(tmp_path / "pre", stage(True))
  assert len(chunks) >= 2 and set(chunks) == {48}  # the reference pass and the loss
  rows = lambda w, kind: [m for m in read_metrics(str(w)) if m["kind"] == kind]
  live, pre = rows(tmp_path / "live", "train"), rows(tmp_path / "pre", "train")
  # Step 1: policy == reference, so the sigmoid loss is log 2 either way.
  assert live[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)
  live_eval, pre_eval = rows(tmp_path / "live", "eval"), rows(tmp_path / "pre", "eval")
  for a, b in zip(live + live_eval, pre + pre_eval):
    for key in ("loss", "rewards/margins", "rewards/chosen", "logps/rejected"):
      assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
  # After training, policy != reference: the reference's log-probs actually enter.
  assert abs(live_eval[-1]["rewards/margins"]) > 1e-3
  with np.load(tmp_path / "pre" / "reference_logps" / "dpo.npz") as saved:
    assert saved["train"].shape == (64, 2) and np.all(saved["train"] < 0)


def test_lora_dpo_uses_its_base_as_reference(tmp_path, start, tokenizer_path):
  lora = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
  run(tmp_path / "lora", dpo(start, tokenizer_path, lora=lora, train=_train(steps=2, every=2)))
  rows = train_rows(tmp_path / "lora", "dpo")
  assert rows[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)  # adapters start at zero
  # Once the adapters moved, the policy differs from its reference (the base with adapters
  # off); were the reference the adapted policy itself, every margin would be exactly 0.
  last_eval = [m for m in read_metrics(str(tmp_path / "lora")) if m["kind"] == "eval"][-1]
  assert abs(last_eval["rewards/margins"]) > 1e-6 and last_eval["loss"] != np.log(2)


def test_lora_reward_model_trains_head_and_loads(tmp_path, start, tokenizer_path):
  from llmjax.runs.load import load_run
  lora = LoraConfig(rank=4, alpha=8, target_modules=("q_proj", "v_proj"))
  ctx, _ = run(tmp_path / "lrm", rm(start, tokenizer_path, lora=lora))
  loaded = load_run(str(tmp_path / "lrm"), "rm")
  assert loaded.model_cfg.head == "score"
  trained = ctx.outputs["rm"].params
  np.testing.assert_array_equal(np.asarray(loaded.params["score"][...]),
                                np.asarray(trained["score"][...]))


def test_reward_model_export_scores_match_transformers(tmp_path, start, tokenizer_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  from llmjax.hf.export import export_run
  from llmjax.model.reward import score_sequences
  from llmjax.runs.load import load_run
  from llmjax.data import chat
  workdir = tmp_path / "rm"
  run(workdir, rm(start, tokenizer_path, train=_train(steps=2, every=2)))
  out = str(tmp_path / "export")
  export_run(str(workdir), out, stage="rm")
  loaded = load_run(str(workdir), "rm")
  pairs = preferences.builtin_pairs("eval", 3)
  seqs = [chat.render_chat(p["prompt"] + p[k], "chatml", loaded.tokenizer)[0]
          for p in pairs for k in ("chosen", "rejected")]
  ours = score_sequences(loaded.graphdef, loaded.params, seqs)
  hf = transformers.AutoModelForSequenceClassification.from_pretrained(out)
  width = max(map(len, seqs))
  pad = hf.config.pad_token_id
  assert all(pad not in s for s in seqs)
  ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
  mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
  with torch.no_grad():
    theirs = hf(input_ids=ids, attention_mask=mask).logits[:, 0].numpy()
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
  assert np.ptp(ours) > 1e-3  # distinct texts, distinct scores: not a constant head


def test_bad_settings_fail_with_clear_errors(tmp_path, start, tokenizer_path):
  with pytest.raises(ConfigError, match=r"beta must be > 0"):
    PreferenceLoss(beta=0.0)
  with pytest.raises(ConfigError, match=r"label_smoothing"):
    PreferenceLoss(loss_type="sigmoid", label_smoothing=0.7)
  with pytest.raises(ConfigError, match=r"\['dpo_typo'\] not available.*'sigmoid'"):
    PreferenceLoss(loss_type="dpo_typo")
  with pytest.raises(ConfigError, match=r"couple the pairs"):
    PreferenceLoss(loss_type="aot")
  with pytest.raises(ConfigError, match=r"reference-free and stand alone"):
    PreferenceLoss(loss_type=("simpo", "sigmoid"))
  with pytest.raises(ConfigError, match=r"reference_from is set"):
    dpo(start, tokenizer_path, loss=PreferenceLoss(loss_type="orpo"), reference_from="sft")
  with pytest.raises(ConfigError, match=r"center_rewards_coefficient"):
    rm(start, tokenizer_path, center_rewards_coefficient=-1.0)
  with pytest.raises(ConfigError, match=r"rm.on_policy samples answers from the stage's start"):
    run_stages([rm(None, tokenizer_path, on_policy=ON_POLICY)],
               RunContext(workdir=str(tmp_path)))


def test_reward_export_of_a_run_without_a_head_fails_and_writes_nothing(tmp_path, start):
  from llmjax.errors import LlmjaxError
  from llmjax.hf.export import export_run
  out = tmp_path / "nope"
  with pytest.raises(LlmjaxError, match=r"reward"):
    export_run(start, str(out), task="reward")
  assert not out.exists()


def test_a_start_without_a_tokenizer_is_refused(tmp_path):
  # Training a fresh tokenizer for trained parameters would scramble their embeddings.
  ctx = RunContext(workdir=str(tmp_path))
  with pytest.raises(ConfigError, match=r"dpo starts from parameters without a tokenizer"):
    ctx.ensure_tokenizer(TokenizerConfig(), ["some text"], TEST_MODEL, "dpo", has_start=True)
  assert not any(tmp_path.iterdir())  # nothing trained, nothing written
