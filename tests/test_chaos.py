"""The crash harness (bench/chaos.py), small: the tiny pretrain command killed with SIGKILL
three times (during an async checkpoint save, during a synchronous one: the next start set
TrainConfig.async_checkpoints=False; during its export) and restarted each time, against an
uninterrupted run of the same command."""

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bench import chaos
from llmjax import checkpoint as ckpt_lib
from llmjax.hf.export import atomic_output_dir
from llmjax.runs.load import load_run


@pytest.fixture(scope="module")
def chaos_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("chaos"))
  return workdir, chaos.run_stage(chaos.STAGES["pretrain"], workdir, kills=3, seed=0,
                                  steps=20, every=5, saves="alternate",
                                  phases=["save", "save", "export"])


def test_killed_run_resumes_exactly(chaos_run):
  _, result = chaos_run
  assert not result.errors, result.errors
  assert [k.planned for k in result.kills] == ["save", "save", "export"]
  saves = result.kills[:2]
  assert [k.sync_saves for k in saves] == [False, True]
  for save in saves:
    assert save.phase == "save" and save.in_flight is not None  # the save window was hit
  for kill in result.kills:
    assert kill.problems == [], kill.row()
    if kill.planned != "export":  # the restart resumed from the newest complete checkpoint
      assert kill.resumed == kill.last_complete and kill.lost <= kill.bound
  # Killed during a synchronous save: training had waited for it, so no step past it ran,
  # and no more than checkpoint_every steps were lost.
  sync = saves[1]
  assert sync.step == sync.in_flight and sync.lost <= 5 and sync.bound == 5
  assert result.corrupt == 0
  # Parameters, optimizer state, RNG and data position; every step's loss; the export.
  assert result.bit_equal == result.losses_equal == result.export_equal == [True]
  assert result.leftovers == []  # no checkpoint or export temporaries remain


def test_harness_sees_a_corrupt_checkpoint_and_a_one_bit_difference(chaos_run, tmp_path):
  workdir, _ = chaos_run
  ckpt = str(tmp_path / "checkpoints")
  shutil.copytree(os.path.join(workdir, "reference", "checkpoints", "pretrain"), ckpt)
  good = chaos.read_checkpoint(ckpt, 20)
  assert chaos.unusable_checkpoints(ckpt) == {}
  with open(os.path.join(ckpt, "15", "params", "manifest.ocdbt"), "wb") as f:
    f.write(b"truncated")
  assert list(chaos.unusable_checkpoints(ckpt)) == [15]
  leaves, tree = jax.tree.flatten(good["params"])
  flipped = [leaf.copy() for leaf in leaves]
  flipped[0].view(np.uint32).flat[0] ^= 1  # the last mantissa bit of one float32
  assert len(chaos.differences(good["params"], jax.tree.unflatten(tree, flipped))) == 1
  assert chaos.differences(good["params"], jax.tree.unflatten(tree, leaves)) == []


def test_export_removes_what_killed_exports_left(tmp_path):
  output = str(tmp_path / "hf")
  # A process that has exited stands for a killed export; this test's own process for one
  # still running.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True).stdout.strip()
  host = __import__("socket").gethostname()
  abandoned = [tmp_path / f".hf.tmp-{host}-{dead}-abc", tmp_path / f".hf.old-{host}-{dead}-d"]
  live = tmp_path / f".hf.tmp-{host}-{os.getpid()}-xyz"
  other = tmp_path / ".other.tmp-x"
  for folder in abandoned + [live, other]:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"half")
  with atomic_output_dir(output) as tmp:
    open(os.path.join(tmp, "config.json"), "w").close()
  assert sorted(os.listdir(tmp_path)) == sorted([".other.tmp-x", live.name, "hf"])


def test_reading_a_run_leaves_its_save_in_flight_alone(chaos_run, tmp_path):
  workdir, _ = chaos_run
  shutil.copytree(os.path.join(workdir, "reference"), tmp_path / "run")
  ckdir = tmp_path / "run" / "checkpoints" / "pretrain"
  in_flight = ckdir / "25.orbax-checkpoint-tmp"  # what the training run is writing now
  shutil.copytree(ckdir / "20", in_flight)
  being_deleted = ckdir / ckpt_lib.TRASH / "5"
  shutil.copytree(ckdir / "10", being_deleted)
  # Export, generation and a later stage's start read the run: they must not delete the
  # save in flight (that crashed the training run) nor anything else.
  assert load_run(str(tmp_path / "run"), "pretrain").step == 20
  assert in_flight.exists() and being_deleted.exists()
  ckpt_lib.Checkpointer(str(ckdir), every=5).close()  # the run itself, restarted, does
  assert not in_flight.exists() and os.listdir(ckdir / ckpt_lib.TRASH) == []


def test_old_checkpoints_leave_through_the_trash(tmp_path, monkeypatch):
  import jax.numpy as jnp
  monkeypatch.setattr(ckpt_lib.Checkpointer, "_empty_trash", lambda self: None)
  ck = ckpt_lib.Checkpointer(str(tmp_path), every=1, keep=1, async_save=False)
  for step in (1, 2):
    ck.save_params_only(step, {"w": jnp.full((2,), step)}, {"step": step})
  ck.wait()
  # Step 1 left the listing in one rename, not file by file where a kill could cut it short.
  assert ck.all_steps() == [2] and os.listdir(tmp_path / ckpt_lib.TRASH) == ["1"]
  ck.close()
  monkeypatch.undo()
  ckpt_lib.Checkpointer(str(tmp_path), every=1).close()
  assert os.listdir(tmp_path / ckpt_lib.TRASH) == []
