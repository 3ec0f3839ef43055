"""llmjax-train's configuration surface and its errors for bad input."""

import glob
import os

import gin
import pytest

from llmjax.cli import gin_flags
from llmjax.cli.train import configure
from llmjax.errors import ConfigError, DataError
from llmjax.stages import RunContext, run_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "experiments/tiny/pretrain.gin"


def test_gin_overrides_change_what_they_should(tmp_path):
  _, bindings = gin_flags.split_gin_shorthand(
      ["--gin.TrainConfig.total_steps=7", "--gin.model_config.overrides={'n_layers': 3}",
       "--gin.SEQ_LEN=64"])
  (stage,) = configure([TINY], bindings + ["OptimizerConfig.learning_rate = 0.01"],
                       str(tmp_path))
  assert stage.train.total_steps == 7
  assert stage.model.n_layers == 3 and stage.model.d_model == 128  # rest of the preset kept
  assert stage.data.seq_len == 64  # a macro reaches every binding that uses it
  assert stage.optimizer.learning_rate == 0.01
  written = (tmp_path / "config.gin").read_text()
  assert "TrainConfig.total_steps = 7" in written and "SEQ_LEN = 64" in written


def test_misspelled_macro_fails_before_anything_with_the_closest_name(tmp_path):
  workdir = tmp_path / "run"
  _, bindings = gin_flags.split_gin_shorthand(["--gin.TOTAL_STEP=100"])
  with pytest.raises(ConfigError, match=r"'TOTAL_STEP'.*ignored.*Did you mean 'TOTAL_STEPS'"):
    configure([TINY], bindings, str(workdir))
  with pytest.raises(ConfigError, match=r"Did you mean 'TrainConfig.log_every'"):
    configure([TINY], ["log_every = 5"], str(workdir))
  assert not workdir.exists()  # nothing written for a start that never began
  (stage,) = configure([TINY], ["TOTAL_STEPS = 100"], str(workdir))
  assert stage.train.total_steps == 100


def test_a_failed_start_leaves_the_runs_config_alone(tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match="DataConfig.format='txt'"):
    configure([TINY], ["DataConfig.format = 'txt'"], str(workdir))
  assert not workdir.exists()
  configure([TINY], ["TOTAL_STEPS = 7"], str(workdir), command=["llmjax-train", "--x"])
  before = (workdir / "config.gin").read_bytes()
  assert b"# command: llmjax-train --x" in before and b"d_model=128" in before  # resolved
  for bad in ("DataConfig.format = 'txt'", "TrainConfig.total_steps = 0", "NOPE = 1",
              "MeshConfig.data = 3"):
    with pytest.raises(ConfigError):
      configure([TINY], [bad], str(workdir))
    assert (workdir / "config.gin").read_bytes() == before
  assert sorted(os.listdir(workdir / "config_history")) == ["0001.gin"]
  configure([TINY], ["TOTAL_STEPS = 9"], str(workdir))
  assert sorted(os.listdir(workdir / "config_history")) == ["0001.gin", "0002.gin"]
  assert (workdir / "config_history" / "0001.gin").read_bytes() == before
  assert "TOTAL_STEPS = 9" in (workdir / "config.gin").read_text()


def test_shorthand_quotes_bare_strings():
  rest, bindings = gin_flags.split_gin_shorthand(
      ["prog", "--workdir=/w", "--gin.DataConfig.format=jsonl", "--gin.X.y=/a/b.txt",
       "--gin.X.z='quoted'", "--gin.X.n=3", "--gin.X.r=@NotRegisteredYet()",
       "--gin.X.m=%SOME_MACRO"])
  assert rest == ["prog", "--workdir=/w"]
  # References and macros stay themselves, even to configurables gin does not know yet.
  assert bindings == ["DataConfig.format = 'jsonl'", "X.y = '/a/b.txt'", "X.z = 'quoted'",
                      "X.n = 3", "X.r = @NotRegisteredYet()", "X.m = %SOME_MACRO"]


@pytest.mark.parametrize("binding, message", [
    ("TrainConfig.total_stepz = 5", "doesn't have a parameter named 'total_stepz'"),
    ("Trainconfig.total_steps = 5", "No configurable matching 'Trainconfig'"),
    ("pipeline.stages = ['pretrain', 'pretrian']", "unknown stage.*pretrian"),
    ("model_config.preset = 'llama9'", "unknown model preset 'llama9'"),
    ("DataConfig.seq_len = 1", "seq_len must be at least 2"),
    ("TrainConfig.loss_scale = 'dynamic'", "is for float16 compute.*'float32'.*needs no loss"),
])
def test_bad_bindings_fail_before_training(tmp_path, binding, message):
  with pytest.raises(ConfigError, match=message):
    configure([TINY], [binding], str(tmp_path))


def test_float16_on_tpu_fails_before_training(tmp_path, monkeypatch):
  import jax
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  with pytest.raises(ConfigError, match="dtype='float16' is not supported on TPU.*bfloat16"):
    configure([TINY], ["model_config.overrides = {'dtype': 'float16'}"], str(tmp_path))


def test_missing_required_value_is_named(tmp_path):
  path = tmp_path / "incomplete.gin"
  path.write_text("pipeline.stages = ['pretrain']\npretrain.model = @model_config()\n")
  with pytest.raises(ConfigError, match=r"Required bindings for `pretrain`.*'data', 'train'"):
    configure([str(path)], [], str(tmp_path))


def test_must_override_values_are_named(tmp_path):
  with pytest.raises(ConfigError, match=r"pretrain.data.train_paths is required"):
    configure(["experiments/llama3_1b/pretrain.gin"], [], str(tmp_path))


def test_missing_gin_file(tmp_path):
  with pytest.raises(ConfigError, match="gin file 'nope.gin' not found"):
    configure(["nope.gin"], [], str(tmp_path))


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "experiments/**/*.gin"),
                                                  recursive=True)))
def test_every_experiment_parses(path, tmp_path):
  # The values recipes mark as must-override, given as a user would to those that read them.
  musts = {"TRAIN_FILES": "['/data/*.jsonl']", "TOKENIZER": "'/data/tokenizer.model'",
           "REWARD_FROM": "'/data/runs/rm'"}
  gin_flags.parse_gin([path], [])
  read = gin.config_str()
  stages = configure([path], [f"{k} = {v}" for k, v in musts.items() if f"%{k}" in read],
                     str(tmp_path))
  assert stages and all(s.model.vocab_size > 0 for s in stages)


def _run(tmp_path, tokenizer_path, bindings):
  stages = configure([TINY], [f"TokenizerConfig.path = '{tokenizer_path}'", *bindings],
                     str(tmp_path))
  run_stages(stages, RunContext(workdir=str(tmp_path)))


def test_missing_data_file(tmp_path, tokenizer_path):
  with pytest.raises(DataError, match="/no/such/file.txt"):
    _run(tmp_path, tokenizer_path, ["DataConfig.format = 'text'",
                                    "DataConfig.train_paths = ['/no/such/file.txt']"])


def test_a_failed_first_start_leaves_no_workdir(tmp_path, tokenizer_path):
  from llmjax.cli.train import run_or_clean_up
  bindings = [f"TokenizerConfig.path = '{tokenizer_path}'", "DataConfig.format = 'text'",
              "DataConfig.train_paths = ['/no/such/file.txt']"]
  fresh = tmp_path / "fresh"
  stages = configure([TINY], bindings, str(fresh))
  assert (fresh / "config.gin").exists()  # written once the config is valid
  with pytest.raises(DataError, match="/no/such/file.txt"):
    run_or_clean_up(stages, RunContext(workdir=str(fresh)), created=True)
  assert not fresh.exists()
  # An existing run is never removed, whatever fails.
  existing = tmp_path / "existing"
  stages = configure([TINY], bindings, str(existing))
  with pytest.raises(DataError):
    run_or_clean_up(stages, RunContext(workdir=str(existing)), created=False)
  assert (existing / "config.gin").exists()


def test_a_bare_path_is_one_path_not_its_characters(tmp_path, tokenizer_path):
  from llmjax.data.instructions import SFTDataConfig
  from llmjax.data.pipeline import DataConfig
  assert DataConfig(train_paths="data/input.txt").train_paths == ("data/input.txt",)
  assert SFTDataConfig(format="jsonl", eval_paths="e.jsonl").eval_paths == ("e.jsonl",)
  # Through gin, as `--gin.DataConfig.train_paths=data/input.txt` gives it.
  with pytest.raises(DataError, match="/no/such/file.txt"):
    _run(tmp_path, tokenizer_path, ["DataConfig.format = 'text'",
                                    "DataConfig.train_paths = '/no/such/file.txt'"])


def test_empty_data_file(tmp_path, tokenizer_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n")
  with pytest.raises(DataError, match="empty"):
    _run(tmp_path, tokenizer_path, ["DataConfig.format = 'text'",
                                    f"DataConfig.train_paths = ['{empty}']"])


def test_bad_jsonl_line_names_file_and_line(tmp_path, tokenizer_path):
  data = tmp_path / "d.jsonl"
  data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"txt": "wrong field"}\n')
  with pytest.raises(DataError, match=r"d.jsonl:3.*'text'.*skip_bad_lines"):
    _run(tmp_path, tokenizer_path, ["DataConfig.format = 'jsonl'",
                                    f"DataConfig.train_paths = ['{data}']"])


def test_tokenizer_larger_than_model_vocab(tmp_path, tokenizer_path):
  with pytest.raises(ConfigError, match="512 pieces.*vocab_size is 256"):
    _run(tmp_path, tokenizer_path, ["model_config.overrides = {'vocab_size': 256}"])
