"""llmjax-train's configuration surface and its errors for bad input."""

import glob
import os
import subprocess
import sys

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


def test_shorthand_quotes_bare_strings():
  rest, bindings = gin_flags.split_gin_shorthand(
      ["prog", "--workdir=/w", "--gin.DataConfig.format=jsonl", "--gin.X.y=/a/b.txt",
       "--gin.X.z='quoted'", "--gin.X.n=3"])
  assert rest == ["prog", "--workdir=/w"]
  assert bindings == ["DataConfig.format = 'jsonl'", "X.y = '/a/b.txt'", "X.z = 'quoted'",
                      "X.n = 3"]


@pytest.mark.parametrize("binding, message", [
    ("TrainConfig.total_stepz = 5", "doesn't have a parameter named 'total_stepz'"),
    ("Trainconfig.total_steps = 5", "No configurable matching 'Trainconfig'"),
    ("pipeline.stages = ['pretrain', 'pretrian']", "unknown stage.*pretrian"),
    ("model_config.preset = 'llama9'", "unknown model preset 'llama9'"),
    ("DataConfig.seq_len = 1", "seq_len must be at least 2"),
])
def test_bad_bindings_fail_before_training(tmp_path, binding, message):
  with pytest.raises(ConfigError, match=message):
    configure([TINY], [binding], str(tmp_path))


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
  # The values every recipe marks as must-override, given as a user would.
  musts = ["TRAIN_FILES = ['/data/*.jsonl']", "TOKENIZER = '/data/tokenizer.model'"]
  stages = configure([path], musts, str(tmp_path))
  assert stages and all(s.model.vocab_size > 0 for s in stages)


def _run(tmp_path, tokenizer_path, bindings):
  stages = configure([TINY], [f"TokenizerConfig.path = '{tokenizer_path}'", *bindings],
                     str(tmp_path))
  run_stages(stages, RunContext(workdir=str(tmp_path)))


def test_missing_data_file(tmp_path, tokenizer_path):
  with pytest.raises(DataError, match="/no/such/file.txt"):
    _run(tmp_path, tokenizer_path, ["DataConfig.format = 'text'",
                                    "DataConfig.train_paths = ['/no/such/file.txt']"])


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


def test_cli_reports_errors_without_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "llmjax.cli.train", f"--workdir={tmp_path}",
       "--gin.TrainConfig.total_stepz=3"], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2
  assert "error: gin config" in proc.stderr and "total_stepz" in proc.stderr
  assert "Traceback" not in proc.stderr
