"""The bad-input corpus: each kind of bad input the console scripts take, run as the script
runs it (`cli.common.run` around what its main calls). Each must end as one line
`error: ...` naming the file, line or key and what to do, exit with status 2 and no
traceback, and leave every existing checkpoint, export and config byte-for-byte as it was
(hashed before and after); an output it would have created must not exist afterwards.

Two cases run the real scripts in a subprocess: the exit code and stderr of a process, and
`--verbosity=1` showing the traceback.
"""

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from typing import Callable, NamedTuple

import numpy as np
import pytest

from llmjax.cli import common
from llmjax.cli.train import configure, run_or_clean_up
from llmjax.model.config import PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/tiny/pretrain.gin"
SFT = "experiments/tiny/sft.gin"
MODEL = PRESETS["tiny"]  # what TINY trains: vocab 512, d_model 128
# Another model: other width and vocabulary, with its own 1024-piece tokenizer.
OTHER_MODEL = dataclasses.replace(MODEL, vocab_size=1024, d_model=64, d_ff=128)


def _random_text_tokenizer(path, vocab_size, seed):
  """A tokenizer of another model: trained on random words, so its pieces differ."""
  from llmjax.data.tokenizer import train_tokenizer
  rng = random.Random(seed)
  words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
           for _ in range(3000)]
  texts = [" ".join(rng.choice(words) for _ in range(30)) for _ in range(3000)]
  return train_tokenizer(texts, str(path), vocab_size=vocab_size).path


def _workdir(path, cfg, tokenizer_path, step=3):
  """A run's workdir holding one params-only checkpoint of a random `cfg` model."""
  import jax
  from flax import nnx
  from llmjax.checkpoint import Checkpointer
  from llmjax.model.transformer import build_model
  from llmjax.runs.load import record_stages
  # Random values from numpy: no initializer to compile.
  rng = np.random.default_rng(step)
  params = jax.tree.map(lambda x: jax.numpy.asarray(0.02 * rng.standard_normal(x.shape),
                                                    x.dtype),
                        nnx.split(nnx.eval_shape(lambda: build_model(cfg)))[1])
  os.makedirs(path)
  shutil.copy(tokenizer_path, os.path.join(path, "tokenizer.model"))
  ckpt = Checkpointer(os.path.join(path, "checkpoints", "pretrain"), every=1, async_save=False)
  meta = {"model": dataclasses.asdict(cfg), "stage": "pretrain", "step": step,
          "tokenizer": "tokenizer.model"}
  ckpt.save_params_only(step, params, meta)
  ckpt.wait()
  ckpt.close()
  record_stages(str(path), ["pretrain"])
  return str(path)


def _params_dir(workdir, step=3):
  return os.path.join(workdir, "checkpoints", "pretrain", str(step), "params")


class Corpus(NamedTuple):
  root: str
  tokenizer: str  # the run's (512 pieces)
  same_size_tokenizer: str  # another model's, also 512 pieces
  workdir: str  # a run of MODEL, with config.gin
  other_workdir: str  # a run of OTHER_MODEL
  export: str  # the HF export of `workdir`
  sharded_export: str
  empty: str


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer_path):
  from llmjax.hf.export import export_run
  root = tmp_path_factory.mktemp("corpus")
  other_tok = _random_text_tokenizer(root / "other.model", 1024, seed=0)
  same_size_tok = _random_text_tokenizer(root / "same_size.model", 512, seed=1)
  workdir = _workdir(root / "run", MODEL, tokenizer_path)
  # The config.gin an llmjax-train start writes (this start is valid: the same model and
  # tokenizer as the checkpoint).
  configure([TINY], [f"TokenizerConfig.path = '{tokenizer_path}'"], workdir)
  other = _workdir(root / "other_run", OTHER_MODEL, other_tok)
  os.makedirs(root / "empty")
  data = root / "data"
  os.makedirs(data)
  for name, text in _DATA_FILES.items():
    (data / name).write_text(text)
  return Corpus(str(root), tokenizer_path, same_size_tok, workdir, other,
                export_run(workdir, str(root / "hf")),
                export_run(workdir, str(root / "hf_sharded"), max_shard_size="200KB"),
                str(root / "empty"))


_DATA_FILES = {
    "pretrain.jsonl": '{"text": "a fine line"}\n{"text": "unterminated\n',
    "sft.jsonl": '{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "Say yo."}\n',
    "pairs.jsonl": '{"prompt": "2+2?", "chosen": "4", "rejected": "5"}\n'
                   '{"prompt": "3+3?", "chosen": "6"}\n',
    "gsm8k.jsonl": '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n'
                   '{"question": "2+2?" "answer": "4"}\n',
    "gsm8k_types.jsonl": '{"question": "1+1?", "answer": "1+1=2\\n#### 2"}\n'
                         '{"question": "2+2?", "answer": 4}\n',
    "unclosed.gin": "include 'experiments/tiny/pretrain.gin'\n"
                    "pipeline.stages = ['pretrain'\n",
    "typo.gin": "include 'experiments/tiny/pretrain.gin'\n\nTrainConfig.log_evry = 1\n",
}


def _hashes(*roots):
  """{path: sha256} of every file under `roots`."""
  out = {}
  for root in roots:
    for directory, _, files in os.walk(root):
      for name in files:
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
          out[path] = hashlib.sha256(f.read()).hexdigest()
  return out


# ---- What each script's main does with its flags ------------------------------------------


def _train(c, workdir, gin_file, *bindings):
  """llmjax-train --workdir=workdir --gin_file=gin_file --gin_bindings=... (one process)."""
  from llmjax.stages import RunContext
  created = not os.path.exists(workdir)
  stages = configure([gin_file], [f"TokenizerConfig.path = '{c.tokenizer}'", *bindings],
                     workdir)
  run_or_clean_up(stages, RunContext(workdir=workdir), created)


def _data(c, name):
  return os.path.join(c.root, "data", name)


def _new(c, name):
  return os.path.join(c.root, "new", name)


def _import(hf, output):
  from llmjax.hf.import_ import import_hf
  import_hf(hf, output)


def _export(workdir, output):
  from llmjax.hf.export import export_run
  export_run(workdir, output)


def _generate(workdir):
  from llmjax.model.reward import refuse_generation
  from llmjax.runs.load import load_run
  run = load_run(workdir)
  refuse_generation(run.model_cfg, workdir)
  run.tokenizer.encode("Alice has", add_bos=True)


def _quantize(workdir, output):
  from llmjax.model.quant import QuantConfig
  from llmjax.runs.quantize_run import quantize_run
  quantize_run(workdir, output, QuantConfig(scheme="int8"))


# ---- Broken copies of good inputs ---------------------------------------------------------


def _copy(c, source, name):
  target = os.path.join(c.root, "broken", name)
  shutil.rmtree(target, ignore_errors=True)
  return shutil.copytree(source, target)


def _truncate(path, size=20):
  with open(path, "rb") as f:
    head = f.read(size)
  with open(path, "wb") as f:
    f.write(head)


def _second_shard(folder):
  return sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))[1]


def _hf_truncated_header(c):
  hf = _copy(c, c.export, "truncated")
  _truncate(os.path.join(hf, "model.safetensors"))
  return hf


def _hf_truncated_shard(c):
  hf = _copy(c, c.sharded_export, "truncated_shard")
  _truncate(os.path.join(hf, _second_shard(hf)))
  return hf


def _hf_missing_shard(c):
  hf = _copy(c, c.sharded_export, "missing_shard")
  os.remove(os.path.join(hf, _second_shard(hf)))
  return hf


def _hf_retyped(c, name, dtype):
  from safetensors.numpy import load_file, save_file
  hf = _copy(c, c.export, name)
  path = os.path.join(hf, "model.safetensors")
  save_file({k: v.astype(dtype) for k, v in load_file(path).items()}, path)
  return hf


def _hf_other_tokenizer(c):
  hf = _copy(c, c.export, "other_tokenizer")
  shutil.copy(os.path.join(c.other_workdir, "tokenizer.model"),
              os.path.join(hf, "tokenizer.model"))
  return hf


def _hf_config(c, name, **changes):
  hf = _copy(c, c.export, name)
  with open(os.path.join(hf, "config.json")) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(os.path.join(hf, "config.json"), "w") as f:
    json.dump({k: v for k, v in cfg.items() if v is not None}, f)
  return hf


def _workdir_other_tokenizer(c):
  workdir = _copy(c, c.workdir, "other_tokenizer_run")
  shutil.copy(os.path.join(c.other_workdir, "tokenizer.model"),
              os.path.join(workdir, "tokenizer.model"))
  return workdir


def _workdir_other_params(c):
  workdir = _copy(c, c.workdir, "other_params_run")
  shutil.rmtree(_params_dir(workdir))
  shutil.copytree(_params_dir(c.other_workdir), _params_dir(workdir))
  return workdir


# ---- The corpus -----------------------------------------------------------------------------


class Case(NamedTuple):
  run: Callable[[Corpus], None]
  error: str  # regex the one error line must match
  output: Callable[[Corpus], str] | None = None  # what the command would have created


CASES = {
    # gin: typos, wrong types, syntax, invalid values; all against an existing run
    "train-gin-typo": Case(
        lambda c: _train(c, c.workdir, TINY, "TrainConfig.total_stepz = 3"),
        r"'TrainConfig' doesn't have a parameter named 'total_stepz'\. \(binding: "
        r"TrainConfig\.total_stepz = 3\) Did you mean TrainConfig\.total_steps\?$"),
    "train-gin-typo-in-file": Case(
        lambda c: _train(c, c.workdir, _data(c, "typo.gin")),
        r"named 'log_evry'\. \(/\S+/typo\.gin:3: TrainConfig\.log_evry = 1\) Did you mean "
        r"TrainConfig\.log_every\?$"),
    "train-gin-unclosed-bracket": Case(
        lambda c: _train(c, c.workdir, _data(c, "unclosed.gin")),
        r"unclosed\.gin: a bracket or quote opened before line 3 is never closed"),
    "train-gin-wrong-type-str": Case(
        lambda c: _train(c, c.workdir, TINY, "TOTAL_STEPS = 'ten'"),
        r"TrainConfig\.total_steps = 'ten' \(via %TOTAL_STEPS\): TrainConfig\.total_steps "
        r"takes int, not str: .*--gin\.TOTAL_STEPS=VALUE$"),
    "train-gin-wrong-type-float": Case(
        lambda c: _train(c, c.workdir, TINY, "DataConfig.batch_size = 2.5"),
        r"DataConfig\.batch_size = 2\.5: .* takes int, not float"),
    "train-gin-undefined-macro": Case(
        lambda c: _train(c, c.workdir, TINY, "TrainConfig.total_steps = %TOTAL_STEP"),
        r"no macro TOTAL_STEP is defined\. Did you mean 'TOTAL_STEPS'\?"),
    "train-gin-invalid-value": Case(  # raised inside a configurable: gin's call sites dropped
        lambda c: _train(c, c.workdir, TINY, "TOTAL_STEPS = 0"),
        r"^error: TrainConfig\.total_steps must be at least 1, got 0$"),
    "train-gin-negative-loss-chunk": Case(
        lambda c: _train(c, c.workdir, TINY, "TrainConfig.loss_chunk_size = -8"),
        r"^error: TrainConfig\.loss_chunk_size must be >= 0 \(0: the whole logits at once\), "
        r"got -8$"),
    # workdirs
    "train-workdir-of-another-model": Case(
        lambda c: _train(c, c.workdir, TINY, "model_config.overrides = {'d_model': 64}"),
        r"/run/checkpoints/pretrain holds a checkpoint of a different model \(d_model: "
        r"checkpoint 128 vs config 64\)\. Use a new --workdir"),
    "train-workdir-tokenizer-of-another-model": Case(
        lambda c: _train(c, c.workdir, TINY,
                         f"TokenizerConfig.path = '{c.same_size_tokenizer}'"),
        r"TokenizerConfig\.path='\S+same_size\.model' is not the tokenizer \S+ was trained with "
        r"\(\S+/run/tokenizer\.model; their vocabularies differ\)"),
    "train-init-from-empty-workdir": Case(
        lambda c: _train(c, _new(c, "sft1"), SFT, f"INIT_FROM = '{c.empty}'"),
        r"no checkpoints under \S+/empty/checkpoints", lambda c: _new(c, "sft1")),
    "train-init-from-another-model": Case(
        lambda c: _train(c, _new(c, "sft2"), SFT, f"INIT_FROM = '{c.other_workdir}'"),
        r"sft\.init_from \(\S+/other_run, stage pretrain\) holds a checkpoint of a different "
        r"model \(vocab_size: checkpoint 1024 vs config 512", lambda c: _new(c, "sft2")),
    # data lines
    "train-pretrain-jsonl-not-json": Case(
        lambda c: _train(c, _new(c, "pre"), TINY, "DataConfig.format = 'jsonl'",
                         f"DataConfig.train_paths = ['{_data(c, 'pretrain.jsonl')}']"),
        r"pretrain\.jsonl:2: not valid JSON .*skip_bad_lines", lambda c: _new(c, "pre")),
    "train-sft-line-incomplete": Case(
        lambda c: _train(c, _new(c, "sft3"), SFT, f"INIT_FROM = '{c.workdir}'",
                         "SFTDataConfig.format = 'jsonl'",
                         f"SFTDataConfig.train_paths = ['{_data(c, 'sft.jsonl')}']"),
        r"sft\.jsonl:2: neither chat form \('messages'\) nor Alpaca form",
        lambda c: _new(c, "sft3")),
    "train-preference-pair-incomplete": Case(
        lambda c: _train(c, _new(c, "dpo"), "experiments/tiny/dpo.gin",
                         "pipeline.stages = ['dpo']", f"dpo.init_from = '{c.workdir}'",
                         "PreferenceDataConfig.format = 'jsonl'",
                         f"PreferenceDataConfig.train_paths = ['{_data(c, 'pairs.jsonl')}']"),
        r"pairs\.jsonl:2: missing \['rejected'\]", lambda c: _new(c, "dpo")),
    "train-gsm8k-line-not-json": Case(
        lambda c: _train(c, _new(c, "grpo1"), "experiments/tiny/grpo.gin",
                         "pipeline.stages = ['grpo']", f"grpo.init_from = '{c.workdir}'",
                         "PromptDataConfig.format = 'gsm8k'",
                         f"PromptDataConfig.train_paths = ['{_data(c, 'gsm8k.jsonl')}']"),
        r"gsm8k\.jsonl:2: not valid JSON .*PromptDataConfig\.skip_bad_lines",
        lambda c: _new(c, "grpo1")),
    "train-gsm8k-answer-not-a-string": Case(
        lambda c: _train(c, _new(c, "grpo2"), "experiments/tiny/grpo.gin",
                         "pipeline.stages = ['grpo']", f"grpo.init_from = '{c.workdir}'",
                         "PromptDataConfig.format = 'gsm8k'",
                         f"PromptDataConfig.train_paths = ['{_data(c, 'gsm8k_types.jsonl')}']"),
        r"gsm8k_types\.jsonl:2: GSM8K lines need string 'question' and 'answer'",
        lambda c: _new(c, "grpo2")),
    # Hugging Face folders
    "import-truncated-safetensors-header": Case(
        lambda c: _import(_hf_truncated_header(c), _new(c, "imp1")),
        r"truncated/model\.safetensors: unreadable safetensors file \(.*header.*\); download "
        r"it again", lambda c: _new(c, "imp1")),
    "import-truncated-shard": Case(
        lambda c: _import(_hf_truncated_shard(c), _new(c, "imp2")),
        r"truncated_shard/model-00002-of-\d{5}\.safetensors: unreadable safetensors file",
        lambda c: _new(c, "imp2")),
    "import-missing-shard": Case(
        lambda c: _import(_hf_missing_shard(c), _new(c, "imp3")),
        r"index\.json lists shard\(s\) \['model-00002-of-\d{5}\.safetensors'\] that are missing"
        r".*download them again", lambda c: _new(c, "imp3")),
    "import-int8-weights": Case(
        lambda c: _import(_hf_retyped(c, "int8", np.int8), _new(c, "imp4")),
        r"tensor model\.embed_tokens\.weight has dtype I8; only floating-point weights",
        lambda c: _new(c, "imp4")),
    "import-tokenizer-of-another-model": Case(
        lambda c: _import(_hf_other_tokenizer(c), _new(c, "imp5")),
        r"other_tokenizer: tokenizer does not fit the model: .* has 1024 pieces but the "
        r"model's vocab_size is 512", lambda c: _new(c, "imp5")),
    "import-config-lacks-a-key": Case(
        lambda c: _import(_hf_config(c, "no_hidden", hidden_size=None), _new(c, "imp6")),
        r"no_hidden: config\.json lacks required field 'hidden_size'",
        lambda c: _new(c, "imp6")),
    "import-config-wrong-type": Case(
        lambda c: _import(_hf_config(c, "str_hidden", hidden_size="big"), _new(c, "imp7")),
        r"str_hidden: config\.json hidden_size='big' is not an integer",
        lambda c: _new(c, "imp7")),
    "import-onto-an-existing-workdir": Case(
        lambda c: _import(c.export, c.other_workdir),
        r"other_run already exists: choose another --output or pass --overwrite"),
    # export, generate and quantize
    "export-empty-workdir": Case(
        lambda c: _export(c.empty, _new(c, "exp1")),
        r"no checkpoints under \S+/empty/checkpoints: train first", lambda c: _new(c, "exp1")),
    "generate-empty-workdir": Case(
        lambda c: _generate(c.empty), r"no checkpoints under \S+/empty/checkpoints"),
    "export-onto-an-export-of-another-model": Case(
        lambda c: _export(c.other_workdir, c.export),
        r"/hf already exists: choose another --output or pass --overwrite"),
    "export-workdir-with-another-models-tokenizer": Case(
        lambda c: _export(_workdir_other_tokenizer(c), _new(c, "exp2")),
        r"tokenizer\.model has 1024 pieces but the model of \S+ has vocab_size 512: it is not "
        r"the tokenizer", lambda c: _new(c, "exp2")),
    "generate-workdir-with-another-models-tokenizer": Case(
        lambda c: _generate(_workdir_other_tokenizer(c)),
        r"has 1024 pieces but the model of \S+ has vocab_size 512"),
    "export-workdir-holding-another-models-params": Case(
        lambda c: _export(_workdir_other_params(c), _new(c, "exp3")),
        r"other_params_run/checkpoints/pretrain/3 holds arrays that do not fit the model its "
        r"meta records \(embed is \[1024, 64\] in the checkpoint, \[512, 128\] in the model;",
        lambda c: _new(c, "exp3")),
    "quantize-onto-another-run": Case(
        lambda c: _quantize(c.workdir, c.other_workdir),
        r"--output=\S+/other_run is the workdir of another run \(it holds the checkpoints of "
        r"\['pretrain'\]\)"),
}


def _run_as_script(fn):
  """The exit code of `fn` run as a console script's main (cli.common.run, absl.app.run).

  absl installs its log handler on the root logger and lowers its level to INFO: undone
  afterwards, so later tests log as before.
  """
  root = logging.getLogger()
  level, handlers = root.level, list(root.handlers)
  try:
    with pytest.raises(SystemExit) as exit_info:
      common.run(lambda argv: fn(), argv=["llmjax-script"])
  finally:
    root.setLevel(level)
    root.handlers[:] = handlers
  return exit_info.value.code


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, corpus, capsys):
  case = CASES[name]
  protected = [corpus.workdir, corpus.other_workdir, corpus.export, corpus.sharded_export]
  before = _hashes(*protected)
  capsys.readouterr()
  code = _run_as_script(lambda: case.run(corpus))
  stderr = capsys.readouterr().err
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert code == 2 and len(errors) == 1, stderr
  assert stderr.rstrip().endswith(errors[0]) and "Traceback" not in stderr, stderr
  assert _hashes(*protected) == before
  assert case.output is None or not os.path.exists(case.output(corpus))
  assert re.search(case.error, errors[0]), errors[0]


def test_float64_weights_import_as_the_float32_they_hold(corpus, tmp_path):
  # Not bad input: F64 (as some research checkpoints are saved) is cast to --dtype, exactly
  # when the values fit float32.
  from llmjax.hf.import_ import import_hf
  from llmjax.runs.load import load_run
  import jax
  ours = load_run(import_hf(_hf_retyped(corpus, "f64", np.float64), str(tmp_path / "f64")))
  theirs = load_run(corpus.workdir)
  for a, b in zip(jax.tree.leaves(ours.params), jax.tree.leaves(theirs.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _script(module, *args):
  return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        cwd=ROOT, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_scripts_exit_2_with_one_line_and_traceback_only_when_verbose(corpus):
  before = _hashes(corpus.workdir)
  proc = _script("llmjax.cli.train", f"--workdir={corpus.workdir}", "--gin.TOTAL_STEPS=ten")
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.splitlines()[-1].startswith("error: gin binding TrainConfig.total_steps")
  assert _hashes(corpus.workdir) == before
  hf = _hf_truncated_header(corpus)
  output = os.path.join(corpus.root, "new", "verbose")
  proc = _script("llmjax.cli.import_", f"--hf={hf}", f"--output={output}", "--verbosity=1")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" in proc.stderr and "in _open_safetensors" in proc.stderr  # where it failed
  assert proc.stderr.splitlines()[-1].startswith(f"error: {hf}/model.safetensors: unreadable")
  assert not os.path.exists(output)
