"""The tiny pipeline end to end: pretrain, then SFT, and held-out exact match before/after."""

import time

import jax
import pytest

from llmjax.runs.load import load_run
from llmjax.data import instructions
from llmjax.metrics import read_metrics
from llmjax.stages import RunContext, run_stages
from llmjax.stages.context import TokenizerConfig
from llmjax.stages.pretrain import Pretrain
from llmjax.stages.sft import SFT, exact_match
from llmjax.data import pipeline
from llmjax.train import loop
from llmjax.train.optimizer import OptimizerConfig
from llmjax.model.lora import LoraConfig

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "lm_head")

from tests.conftest import TEST_MODEL

PRETRAIN_STEPS, SFT_STEPS = 200, 150
HELD_OUT = 300  # the whole default eval split: held-out phrasings and arithmetic


def sft_stage(tok: TokenizerConfig, learning_rate: float, **kwargs) -> SFT:
  return SFT(
      model=TEST_MODEL,
      data=instructions.SFTDataConfig(seq_len=128, batch_size=16, builtin_train=800,
                                      builtin_eval=HELD_OUT, eval_batches=1),
      train=loop.TrainConfig(total_steps=SFT_STEPS, log_every=50, eval_every=SFT_STEPS,
                             checkpoint_every=SFT_STEPS),
      optimizer=OptimizerConfig(learning_rate=learning_rate, warmup_steps=20,
                                weight_decay=0.0),
      tokenizer=tok, eval_questions=HELD_OUT, **kwargs)


def pipeline_stages(tok: TokenizerConfig) -> list:
  pre = Pretrain(
      model=TEST_MODEL, data=pipeline.DataConfig(seq_len=128, batch_size=16, eval_batches=1),
      train=loop.TrainConfig(total_steps=PRETRAIN_STEPS, log_every=50,
                             eval_every=PRETRAIN_STEPS, checkpoint_every=PRETRAIN_STEPS),
      optimizer=OptimizerConfig(learning_rate=3e-3, warmup_steps=20, weight_decay=0.1),
      tokenizer=tok)
  return [pre, sft_stage(tok, learning_rate=3e-3)]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tokenizer_path):
  workdir = str(tmp_path_factory.mktemp("pipeline"))
  t0 = time.time()
  run_stages(pipeline_stages(TokenizerConfig(path=tokenizer_path)), RunContext(workdir=workdir))
  print(f"pipeline: {time.time() - t0:.0f}s")
  return workdir


def test_sft_raises_held_out_exact_match(pipeline_run, tokenizer):
  items = instructions.reference_items(instructions.builtin_conversations("eval", HELD_OUT))
  pre = load_run(pipeline_run, "pretrain")
  before = exact_match(pre.graphdef, pre.params, tokenizer, "chatml", items)["exact_match"]
  evals = [r for r in read_metrics(pipeline_run) if r["stage"] == "sft" and r["kind"] == "eval"]
  after = evals[-1]["exact_match"]
  print(f"held-out exact match: pretrained {before:.3f}, after SFT {after:.3f}")
  # Measured (2 CPU cores, ~50 s for both stages): pretrained 0.000, after SFT 0.260 for this
  # budget (d_model 64, 200 + 150 steps). The pretrained model does not answer at all; the SFT
  # model answers in format and gets a quarter of the held-out questions (new phrasings,
  # unseen arithmetic problems) right. The bound 0.15 sits 0.1 below that, room for numeric
  # drift across CPUs and library versions (a nearby setting, SFT lr 2e-3 with 2000
  # questions, gave 0.17), yet above the 0.10 this fixture measured before the world's
  # statements, FAQ text and question phrasings were fixed, so that regression fails. The
  # full tiny pipeline (experiments/tiny/pipeline.gin) reaches ~0.7; see README.md,
  # "Instruction tuning (SFT) and generation".
  assert before <= 0.03
  assert after >= 0.15


@pytest.fixture(scope="module")
def lora_sft_run(pipeline_run, tmp_path_factory, tokenizer_path):
  """LoRA SFT (r=16 on every projection) from the same pretrained stage, its own workdir."""
  workdir = str(tmp_path_factory.mktemp("lora_sft"))
  sft = sft_stage(TokenizerConfig(path=tokenizer_path), learning_rate=7e-3,
                  init_from=f"{pipeline_run}:pretrain",
                  lora=LoraConfig(rank=16, alpha=32.0, target_modules=LORA_TARGETS))
  run_stages([sft], RunContext(workdir=workdir))
  return workdir


def test_lora_sft_comes_close_to_full_sft(pipeline_run, lora_sft_run):
  def final(workdir):
    evals = [r for r in read_metrics(workdir) if r["stage"] == "sft" and r["kind"] == "eval"]
    return evals[-1]["exact_match"]
  full, lora_em = final(pipeline_run), final(lora_sft_run)
  print(f"held-out exact match: full SFT {full:.3f}, LoRA SFT {lora_em:.3f}")
  # Measured (2 CPU cores): full SFT 0.260, LoRA SFT 0.193 (r=16 on every projection and
  # lm_head, lr 7e-3; without lm_head 0.167; lr 2e-2 0.117, 4e-2 0.000). The pretrained
  # start answers none (0.000), so the bounds fail if the adapters do not train.
  assert lora_em >= 0.12
  assert lora_em >= full - 0.12
  run = load_run(lora_sft_run)
  assert run.meta["base"]["stage"] == "pretrain" and run.meta["lora"]["rank"] == 16


def test_sft_checkpoint_records_the_chat_template(pipeline_run):
  run = load_run(pipeline_run)
  assert run.stage == "sft" and run.meta["chat_template_name"] == "chatml"
  assert "<|im_start|>" in run.meta["chat_template"]
  data = [r for r in read_metrics(pipeline_run) if r["stage"] == "sft" and r["kind"] == "data"]
  assert data[0]["train_examples"] > 0 and data[0]["train_dropped_overlong"] == 0


def test_exported_chat_model_stops_at_the_end_of_its_turn(pipeline_run, tmp_path, tokenizer):
  """transformers.generate on the export ends the reply at <|im_end|>, not at max_new_tokens."""
  transformers = pytest.importorskip("transformers")
  import torch
  from llmjax.data import chat
  from llmjax.hf.export import export_run
  out = export_run(pipeline_run, str(tmp_path / "hf"))
  im_end = tokenizer.token_id("<|im_end|>")
  gen = transformers.GenerationConfig.from_pretrained(out)
  assert im_end in gen.eos_token_id and tokenizer.eos_id in gen.eos_token_id
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  items = instructions.reference_items(instructions.builtin_conversations("eval", 20))
  stopped = 0
  for item in items:
    prompt = chat.prompt_ids(item["messages"], "chatml", tokenizer)
    ids = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0]
    reply = ids[len(prompt):].tolist()
    stopped += reply[-1] == im_end and len(reply) < 24
  assert stopped >= 15  # the SFT model ends (nearly) every reply; before the fix none stopped


def test_report_card_answers_as_the_stages_evaluate(pipeline_run, tokenizer, tokenizer_path,
                                                    monkeypatch):
  """The report's prompts table: the untrained model pretrain started from, then each stage,
  in order; its ✓ marks count what the SFT stage's own held-out exact match counts."""
  from flax import nnx
  from llmjax.data import chat
  from llmjax.model.transformer import build_model
  from llmjax.report import answers, card, plots
  from llmjax.sample.sampler import Sampler
  items = instructions.reference_items(instructions.builtin_conversations("eval", 40))
  prompts = [answers.Prompt(it["messages"][-1]["content"], it["answer"]) for it in items]
  table = answers.answer_table(pipeline_run, ["pretrain", "sft"], prompts, template="chatml",
                               random_init=(TEST_MODEL, 0), max_new_tokens=16)
  models = [answers.RANDOM_INIT, "pretrain", "sft"]
  assert [(a.model, a.prompt) for a in table] == [(m, p) for m in models for p in prompts]
  sft = load_run(pipeline_run, "sft")
  logged = exact_match(*sft.float_model(), tokenizer, "chatml", items)["exact_match"]
  assert sum(a.right for a in table if a.model == "sft") == round(logged * len(items)) > 0
  # Pretrain's start: its policy role builds the model with TrainConfig.seed, 0.
  untrained = jax.jit(lambda: nnx.split(build_model(TEST_MODEL, 0)))()
  sampler = Sampler(*untrained, tokenizer, eos_ids=chat.stop_token_ids(tokenizer, "chatml"))
  out = sampler.sample([chat.prompt_ids(it["messages"], "chatml", tokenizer) for it in items],
                       max_new_tokens=16)
  assert [a.text for a in table if a.model == answers.RANDOM_INIT] == [t[0] for t in out.texts]
  # The report of the run's stages: the same rows (the template from sft, pretrain's seed).
  monkeypatch.setattr(plots, "_pyplot", lambda: None)  # plots: tests/test_report.py
  stages = pipeline_stages(TokenizerConfig(path=tokenizer_path))
  text = open(card.write_report(pipeline_run, stages, prompts, max_new_tokens=16,
                                log=lambda _: None)).read()
  for a in table:
    assert f"| {a.model} | {card._cell(card._shortened(a.text)) or '(nothing)'} |" in text
  # Each stage's start logged its wall clock, which the time column shows.
  times = {r["stage"]: r for r in read_metrics(pipeline_run) if r["kind"] == "time"}
  assert sorted(times) == ["pretrain", "sft"] and times["sft"]["step"] == SFT_STEPS
  assert f"| sft | sft | {SFT_STEPS} | {card._minutes(times['sft']['seconds'])} |" in text
