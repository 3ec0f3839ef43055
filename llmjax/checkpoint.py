"""Orbax checkpoints that resume exactly: train state, data iterator position, model config.

Layout of `<workdir>/checkpoints/<stage>/<step>/`:
  params/ the model parameters alone, so export and generation read only what they need
  train/  optimizer state, step, RNG (OCDBT; sharded arrays restore resharded)
  data/   each process's data position (`process_<p>-of-<n>.json`; see `DataHandler`)
  meta/   JSON: the model config and what produced the checkpoint

Orbax writes each step into a temporary directory and renames it into place only after every
item is written, so a crash mid-save leaves nothing that `latest_step()` will pick up. Old
steps leave the same way: renamed into `.deleted/` in one step, then deleted (see `TRASH`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
import grain

from llmjax.errors import CheckpointError
from llmjax.model.config import ModelConfig


# Orbax deletes an old step's files one by one, in place: a process killed meanwhile (found
# by bench/chaos.py) left a step directory that lists as saved but does not restore. Moved
# into this subfolder first (one rename), a step being deleted is never listed; what is there
# is deleted after the next save starts, at close, and by the next start (a killed run's).
# (Orbax ignores the option on gs://, where it deletes in place as before.)
TRASH = ".deleted"


class DataHandler(grain.checkpoint.CheckpointHandler):
  """grain's handler (each process writes its data position to `process_<p>-of-<n>.json`)
  that also restores on another process count.

  A data order that does not depend on the process count
  (`llmjax.data.global_order`: its iterator has `restores_on_any_process_count`) saves
  named parts; a restore reads every process's file and hands the iterator all the parts,
  from which it takes its own. Any other source (RL rollouts, holding this process's
  samples) restores only on the process count that saved it.
  """

  def restore(self, directory: Any, item: Any = None, args: Any = None) -> Any:
    item = item or args.item
    files = sorted(directory.glob("process_*-of-*.json"))
    if not getattr(item, "restores_on_any_process_count", False):
      own = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
      if files and own not in {f.name for f in files}:
        saved = re.fullmatch(r"process_\d+-of-(\d+)\.json", files[0].name)
        raise CheckpointError(
            f"{directory} holds the data position of {saved.group(1) if saved else '?'} "
            f"processes, and this run has {jax.process_count()}: {type(item).__name__} "
            "resumes only on the process count that saved it. Restart with that many "
            "processes, or use a new --workdir")
      return super().restore(directory, item, args)
    parts: dict[str, Any] = {}
    for path in files:
      for name, part in json.loads(path.read_text()).items():
        if parts.setdefault(name, part) != part:
          raise CheckpointError(f"{directory}: the processes saved different positions for "
                                f"the data part {name!r} (a checkpoint of an llmjax before the "
                                "global data order?): resume it with the llmjax that wrote it, "
                                "or use a new --workdir")
    item.set_state(json.dumps(parts).encode())
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(DataHandler, for_save=True)
@dataclasses.dataclass
class DataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(DataHandler, for_restore=True)
@dataclasses.dataclass
class DataRestore(ocp.args.CheckpointArgs):
  item: Any


class Checkpointer:
  """Saves every `every` steps, keeps the newest `keep`.

  `async_save`: `save` returns once the arrays are copied to host memory and the files are
  written in the background (committed by the next save, `wait` or `close`); False: `save`
  returns only when the step is committed on disk (TrainConfig.async_checkpoints).

  `read_only`: for reading another process's run (export, generation, a stage's start). It
  changes nothing on disk: a writer deletes unfinished saves when it opens the folder, which
  would delete the save a training run of that folder has in flight and crash it.
  """

  def __init__(self, directory: str, every: int, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = os.path.abspath(directory)
    self.every = every
    self.read_only = read_only
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                             save_interval_steps=0)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True, todelete_subdir=TRASH)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"params": ocp.StandardCheckpointHandler(),
                       "train": ocp.StandardCheckpointHandler(),
                       "data": DataHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._empty_trash()

  def _empty_trash(self) -> None:
    trash = os.path.join(self.directory, TRASH)
    if not self.read_only and jax.process_index() == 0 and os.path.isdir(trash):
      for name in os.listdir(trash):
        shutil.rmtree(os.path.join(trash, name), ignore_errors=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def resolve_step(self, step: int | None) -> int:
    """`step`, or the latest when None; CheckpointError listing the saved steps otherwise."""
    resolved = step if step is not None else self.latest_step()
    if resolved is None or resolved not in self.all_steps():
      raise CheckpointError(f"no checkpoint step {step if step is not None else ''} in "
                            f"{self.directory}; saved steps: {self.all_steps()}")
    return resolved

  def should_save(self, step: int) -> bool:
    return step % self.every == 0

  def save(self, step: int, state: Any, data_iter: Any | None, meta: dict[str, Any]) -> None:
    """Saves `state` (a dict with 'params') and the iterator position: started (async_save)
    or committed (not) on return."""
    train = {k: v for k, v in state.items() if k != "params"}
    items = {"params": ocp.args.StandardSave(state["params"]),
             "train": ocp.args.StandardSave(train), "meta": ocp.args.JsonSave(meta)}
    if data_iter is not None:
      items["data"] = DataSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._empty_trash()  # the save before this one has finished: its deletions are done

  def save_params_only(self, step: int, params: Any, meta: dict[str, Any]) -> None:
    """Saves parameters and meta without train/data state (an import or export source).

    `restore_params`, `read_meta` and `load_run` read it like any other step; `restore`
    (resuming training) cannot, as there is no optimizer state to resume.
    """
    items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    self._empty_trash()

  def read_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """The state at `step`, laid out like `abstract_state` (shapes, dtypes, shardings).

    `data_iter`, when given, is moved to the saved position in place.
    """
    train = {k: v for k, v in abstract_state.items() if k != "params"}
    items = {"params": ocp.args.StandardRestore(abstract_state["params"]),
             "train": ocp.args.StandardRestore(train)}
    if data_iter is not None:
      items["data"] = DataRestore(data_iter)
    restored = self._restore(step, ocp.args.Composite(**items))
    return {"params": restored["params"], **restored["train"]}

  def restore_params(self, step: int, abstract_params: Any) -> Any:
    """Only the parameters at `step` (for generation and export)."""
    args = ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params))
    return self._restore(step, args)["params"]

  def _restore(self, step: int, args: Any) -> Any:
    self._check_shapes(step, args["params"].item)
    return self._manager.restore(step, args=args)

  def _check_shapes(self, step: int, abstract_params: Any) -> None:
    """CheckpointError naming the arrays whose saved shape is not the model's (a checkpoint
    altered or mixed with another run's): Orbax would refuse them naming neither."""
    try:
      saved = self._manager.item_metadata(step)["params"]
      saved = dict(_shapes_by_path(getattr(saved, "tree", saved)))
    except Exception:  # pylint: disable=broad-except  # no metadata: Orbax checks alone
      return
    wrong = [f"{path} is {list(saved[path])} in the checkpoint, {list(shape)} in the model"
             for path, shape in _shapes_by_path(abstract_params)
             if path in saved and tuple(saved[path]) != tuple(shape)]
    if wrong:
      raise CheckpointError(
          f"{self.directory}/{step} holds arrays that do not fit the model its meta records "
          f"({'; '.join(wrong[:3])}{'; ...' if len(wrong) > 3 else ''}): the checkpoint was "
          "altered or mixed with another run's; restore it from a copy or retrain")

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._manager.wait_until_finished()
    self._empty_trash()

  def close(self) -> None:
    # Orbax deletes a writer's leftover unfinished saves in a background future that only its
    # next save awaits; a writer closed before saving (a run stopped during start-up) must
    # not exit with that deletion cut short. A private method: absent, nothing to await.
    getattr(self._manager, "_maybe_await_cleanup_tmp_directory", lambda: None)()
    self._manager.close()
    self._empty_trash()


def check_same_model(saved: dict[str, Any], cfg: ModelConfig, where: str) -> None:
  """Raises CheckpointError naming each shape field where `saved` and `cfg` differ."""
  ours = cfg.shape_dict()
  theirs = ModelConfig.from_dict(saved).shape_dict()
  diffs = [f"{k}: checkpoint {theirs.get(k)!r} vs config {ours[k]!r}"
           for k in ours if theirs.get(k) != ours[k]]
  if diffs:
    raise CheckpointError(
        f"{where} holds a checkpoint of a different model ({'; '.join(diffs)}). Use a new "
        "--workdir, or set the model config back to the checkpoint's.")


def _shapes_by_path(tree: Any) -> list[tuple[str, tuple[int, ...]]]:
  """('layers/0/attn/q_proj', shape) of each array-like leaf, whatever the key types."""
  out = []
  for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in keys]
    if hasattr(leaf, "shape"):
      out.append(("/".join(n for n in names if n != "value"), tuple(leaf.shape)))
  return out


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) describing `tree`, for restoring into its layout."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
