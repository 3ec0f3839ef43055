"""Sharded and multi-process runs for tests/parallel (run as a script in a fresh process,
because the device count is fixed when jax starts).

  python tests/parallel/worker.py meshes
  python tests/parallel/worker.py eight   # meshes, accum 4,1,2 and sample 1,2,4 in one process
  python tests/parallel/worker.py train --mesh=1,4,1 --workdir=W --out=F [--process_id=...]
  python tests/parallel/worker.py restore --mesh=1,1,2 --workdir=W --out=F
  python tests/parallel/worker.py accum --mesh=4,1,2
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

MODEL = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128,
             max_seq_len=64)
GLOBAL_BATCH, SEQ, STEPS = 8, 32, 4


def batches(n=STEPS + 1, rows=GLOBAL_BATCH):
  """Global batches of random tokens, each row two packed documents."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(n):
    tokens = rng.integers(4, MODEL["vocab_size"], (rows, SEQ + 1), dtype=np.int32)
    seg = np.where(np.arange(SEQ) < 20, 1, 2).astype(np.int32)
    pos = np.where(np.arange(SEQ) < 20, np.arange(SEQ), np.arange(SEQ) - 20).astype(np.int32)
    out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
                "loss_mask": np.ones((rows, SEQ), np.int32),
                "segment_ids": np.tile(seg, (rows, 1)), "positions": np.tile(pos, (rows, 1))})
  return out


def mesh_of(text):
  """'data,fsdp,tensor[,expert]' sizes."""
  from llmjax.parallel import mesh as mesh_lib
  d, f, t, *e = (int(x) for x in text.split(","))
  return mesh_lib.make_mesh(mesh_lib.MeshConfig(data=d, fsdp=f, tensor=t, expert=(e or [1])[0]))


def model_cfg():
  from llmjax.model.config import ModelConfig
  return ModelConfig(**MODEL)


def meshes(_):
  """Loss and gradients on each mesh vs one device, and the parameter shardings."""
  import jax
  from flax import nnx
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train.losses import lm_loss

  cfg = model_cfg()
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  batch = batches(1)[0]

  def loss_and_grads(p, b):
    return jax.value_and_grad(lambda q: lm_loss(nnx.merge(graphdef, q), b)[0])(p)

  one = jax.devices()[0]
  ref_loss, ref_grads = jax.jit(loss_and_grads)(jax.device_put(params, one),
                                                jax.device_put(batch, one))
  results = {}
  for shape in ("8,1,1", "1,8,1", "1,1,8", "2,2,2"):
    mesh = mesh_of(shape)
    rules = mesh_lib.RULE_SETS["fsdp_tensor"]
    abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=0)))[1]
    p_shard = mesh_lib.param_shardings(abstract, mesh, rules)
    b_shard = mesh_lib.batch_sharding(mesh, rules)

    def fn(p, b):
      with mesh_lib.activation_sharding(mesh, rules):
        return loss_and_grads(p, b)
    sharded_params = jax.jit(lambda p: p, out_shardings=p_shard)(params)
    loss, grads = jax.jit(fn, in_shardings=(p_shard, b_shard))(
        sharded_params, mesh_lib.host_batch_to_global(batch, b_shard))
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    layer = sharded_params["layers"][0]
    jaxpr = str(jax.make_jaxpr(fn)(sharded_params, batch))
    results[shape] = {
        "vocab_parallel_loss": "shard_map" in jaxpr,
        "loss": float(loss), "ref_loss": float(ref_loss), "grad_max_abs_diff": diff,
        "grad_max_abs": max(float(np.abs(np.asarray(g)).max())
                            for g in jax.tree.leaves(ref_grads)),
        "specs": {name: str(v.sharding.spec) for name, v in [
            ("embed", sharded_params["embed"]), ("q_proj", layer["attn"]["q_proj"]),
            ("k_proj", layer["attn"]["k_proj"]), ("down_proj", layer["mlp"]["down_proj"]),
            ("norm", layer["input_norm"]["weight"])]},
        "batch_spec": str(b_shard.spec)}
  results["moe"] = moe_meshes()
  return results


def moe_meshes():
  """A mixture of experts (8 experts, top-2, z-loss on) on expert-parallel meshes vs one
  device: the loss with its router losses, and the gradients, through the loop's
  `_call_loss`; dropless and with a capacity factor that drops assignments."""
  import dataclasses
  import jax
  from flax import nnx
  from llmjax.model.config import ModelConfig
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective

  dropless = ModelConfig(**MODEL, n_experts=8, n_experts_per_token=2, d_ff_expert=32,
                         router_z_loss_coef=1e-3)
  batch = batches(1)[0]
  out = {}
  for name, cfg in (("dropless", dropless),
                    ("capacity", dataclasses.replace(dropless, moe_capacity_factor=1.0))):
    graphdef, params = nnx.split(build_model(cfg, seed=0))

    def loss_and_grads(p, b):
      def f(q):
        loss_sum, count, aux = loop._call_loss(lm_objective(),
                                               {"policy": nnx.merge(graphdef, q)}, b)
        return loss_sum / count, aux
      return jax.value_and_grad(f, has_aux=True)(p)
    one = jax.devices()[0]
    (ref_loss, ref_aux), ref_grads = jax.jit(loss_and_grads)(jax.device_put(params, one),
                                                             jax.device_put(batch, one))
    meshes = ("2,1,1,4", "1,2,2,2") if name == "dropless" else ("1,2,1,4",)
    for shape in meshes:
      mesh = mesh_of(shape)
      rules = mesh_lib.RULE_SETS["fsdp_tensor"]
      p_shard = mesh_lib.param_shardings(params, mesh, rules)
      b_shard = mesh_lib.batch_sharding(mesh, rules)

      def fn(p, b):
        with mesh_lib.activation_sharding(mesh, rules):
          return loss_and_grads(p, b)
      sharded = jax.jit(lambda p: p, out_shardings=p_shard)(params)
      (loss, aux), grads = jax.jit(fn, in_shardings=(p_shard, b_shard))(
          sharded, mesh_lib.host_batch_to_global(batch, b_shard))
      layer = sharded["layers"][0]["mlp"]
      out[f"{name}:{shape}"] = {
          "loss": float(loss), "ref_loss": float(ref_loss),
          "dropped": float(aux["moe/dropped_fraction"][0]),
          "ref_dropped": float(ref_aux["moe/dropped_fraction"][0]),
          "grad_max_abs_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                   for a, b in zip(jax.tree.leaves(grads),
                                                   jax.tree.leaves(ref_grads))),
          "grad_max_abs": max(float(np.abs(np.asarray(g)).max())
                              for g in jax.tree.leaves(ref_grads)),
          "router_grad_max_abs": float(np.abs(np.asarray(
              ref_grads["layers"][0]["mlp"]["router"][...])).max()),
          "gate_spec": str(layer["gate_proj"].sharding.spec),
          "down_spec": str(layer["down_proj"].sharding.spec),
          "local_experts": layer["gate_proj"].addressable_shards[0].data.shape[0],
          "shard_map": "shard_map" in str(jax.make_jaxpr(fn)(sharded, batch)),
          "batch_spec": str(b_shard.spec)}
  return out


def accum(args):
  """One train step with grad_accum 4 on `--mesh` vs one device: metrics and the update.

  8 rows in 4 microbatches leave 2 rows per microbatch, fewer than the 4 data devices of
  mesh 4,1,2: the rows of a microbatch are replicated, not split, over `data`.
  """
  import jax
  import optax
  from flax import nnx
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective

  cfg = model_cfg()
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  batch = batches(1)[0]
  # Unequal microbatches (rows 0 and 4 are microbatch 0), and a count no multiple of the
  # mesh sizes, so a count scaled by any replication factor cannot pass for the true one.
  batch["loss_mask"][0, 5:] = 0
  batch["loss_mask"][4, 11:] = 0
  batch["loss_mask"][3, :7] = 0
  # SGD with lr 1: the update is the gradient itself, so a scaled gradient shows.
  tx, sched = optax.sgd(1.0), optax.constant_schedule(1.0)
  train_step = loop.make_train_step({"policy": graphdef}, tx, sched, lm_objective(),
                                    grad_accum_steps=4)

  def step(state, b):
    return train_step(state, {"policy": nnx.State({})}, b)

  def state_of(p):
    return loop.init_train_state({"policy": p}, tx)

  one = jax.devices()[0]
  ref_state, ref_metrics = jax.jit(step)(jax.device_put(state_of(params), one),
                                         jax.device_put(batch, one))
  mesh = mesh_of(args.mesh)
  rules = mesh_lib.RULE_SETS["fsdp_tensor"]
  p_shard = mesh_lib.param_shardings(params, mesh, rules)
  b_shard = mesh_lib.batch_sharding(mesh, rules)

  def fn(state, b):
    with mesh_lib.activation_sharding(mesh, rules):
      return step(state, b)
  sharded = jax.jit(lambda p: p, out_shardings=p_shard)(params)
  state, metrics = jax.jit(fn)(state_of(sharded), mesh_lib.host_batch_to_global(batch, b_shard))
  jaxpr = str(jax.make_jaxpr(fn)(state_of(sharded), batch))
  new, ref = jax.tree.leaves(state["params"]), jax.tree.leaves(ref_state["params"])
  return {"vocab_parallel_loss": "shard_map" in jaxpr,
          "metrics": {k: float(v) for k, v in metrics.items()},
          "ref_metrics": {k: float(v) for k, v in ref_metrics.items()},
          "expected_count": float(batch["loss_mask"].sum()),
          "update_max_abs_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                     for a, b in zip(new, ref)),
          "update_max_abs": max(float(np.abs(np.asarray(a) - np.asarray(p)).max())
                                for a, p in zip(ref, jax.tree.leaves(params)))}


def train(args):
  """A few steps of the real loop on `--mesh`; this process feeds its rows of each batch."""
  import grain
  import jax
  from llmjax import metrics
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective
  from llmjax.train.optimizer import OptimizerConfig
  from llmjax.train.roles import policy_role

  mesh = mesh_of(args.mesh)
  n, p = jax.process_count(), jax.process_index()
  local = [{k: v[p * GLOBAL_BATCH // n:(p + 1) * GLOBAL_BATCH // n] for k, v in b.items()}
           for b in batches()]
  data = grain.MapDataset.source(local).to_iter_dataset()
  writer = metrics.MetricsWriter(args.workdir, "pretrain", STEPS, enabled=p == 0)
  result = loop.train(
      stage="pretrain", workdir=args.workdir, policy=policy_role(model_cfg()),
      loss_fn=lm_objective(),
      train_data=data, eval_data=[local[-1]],
      train_cfg=loop.TrainConfig(total_steps=STEPS, log_every=1, eval_every=STEPS,
                                 checkpoint_every=STEPS),
      opt_cfg=OptimizerConfig(learning_rate=1e-2, warmup_steps=1), writer=writer,
      mesh=mesh, rules="fsdp_tensor", meta={"tokenizer": None})
  writer.close()
  from jax.experimental import multihost_utils
  params = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
            for x in jax.tree.leaves(result.params)]
  records = [r for r in metrics.read_metrics(args.workdir) if r["kind"] == "train"] if p == 0 else []
  return {"params": params, "steps": [r["step"] for r in records],
          **{key: [r[key] for r in records] for key in ("loss", "grad_norm", "target_tokens")},
          "specs": [str(x.sharding.spec) for x in jax.tree.leaves(result.params)]}


def restore(args):
  """Restores the run in `--workdir` onto `--mesh` in this single process."""
  import jax
  from flax import nnx
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.runs.load import load_run

  mesh = mesh_of(args.mesh)
  abstract = nnx.split(nnx.eval_shape(lambda: build_model(model_cfg())))[1]
  shardings = mesh_lib.param_shardings(abstract, mesh, mesh_lib.RULE_SETS["fsdp_tensor"])
  target = mesh_lib.sharded_abstract(abstract, shardings)
  run = load_run(args.workdir, abstract_params=target)
  leaves = jax.tree.leaves(run.params)
  return {"params": [np.asarray(x) for x in leaves], "step": run.step,
          "specs": [str(x.sharding.spec) for x in leaves]}


def sample(args):
  """Greedy generation with tensor/FSDP-sharded parameters vs the same on one device."""
  import jax
  from flax import nnx
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.sample.sampler import Sampler

  cfg = model_cfg()
  graphdef, params = nnx.split(build_model(cfg, seed=3))
  rng = np.random.default_rng(1)
  prompts = [rng.integers(4, cfg.vocab_size, n).tolist() for n in (5, 11, 3, 8)]
  kwargs = dict(max_new_tokens=12, num_samples=2, temperature=0.0)
  single = Sampler(graphdef, jax.device_put(params, jax.devices()[0]), eos_ids=[3], pad_id=0)
  expected = single.sample(prompts, **kwargs)
  mesh = mesh_of(args.mesh)
  abstract = nnx.split(nnx.eval_shape(lambda: build_model(cfg, seed=3)))[1]
  shardings = mesh_lib.param_shardings(abstract, mesh, mesh_lib.RULE_SETS["fsdp_tensor"])
  sharded = jax.jit(lambda p: p, out_shardings=shardings)(params)
  got = Sampler(graphdef, sharded, eos_ids=[3], pad_id=0).sample(prompts, **kwargs)
  return {"tokens_equal": bool((got.tokens == expected.tokens).all()),
          "logprob_max_diff": float(np.abs(got.logprobs - expected.logprobs).max()),
          "sharded": str(sharded["layers"][0]["attn"]["q_proj"].sharding.spec),
          "generated": int(expected.lengths.sum()), "moe": moe_sample(prompts, kwargs)}


def moe_sample(prompts, kwargs):
  """An MoE model's greedy generation on an expert x fsdp mesh under the training step's
  activation sharding (RL rollouts: the experts run under shard_map) vs one device."""
  import dataclasses
  import jax
  from flax import nnx
  from llmjax.model.config import ModelConfig
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.sample.sampler import Sampler

  cfg = dataclasses.replace(ModelConfig(**MODEL), n_experts=8, d_ff_expert=32, init_std=0.2)
  graphdef, params = nnx.split(build_model(cfg, seed=3))
  single = Sampler(graphdef, jax.device_put(params, jax.devices()[0]), eos_ids=[3], pad_id=0)
  expected = single.sample(prompts, **kwargs)
  mesh, rules = mesh_of("1,2,1,4"), mesh_lib.RULE_SETS["fsdp_tensor"]
  sharded = jax.jit(lambda p: p, out_shardings=mesh_lib.param_shardings(params, mesh, rules))(
      params)
  with mesh_lib.activation_sharding(mesh, rules):
    got = Sampler(graphdef, sharded, eos_ids=[3], pad_id=0).sample(prompts, **kwargs)
  return {"tokens_equal": bool((got.tokens == expected.tokens).all()),
          "logprob_max_diff": float(np.abs(got.logprobs - expected.logprobs).max()),
          "experts": str(sharded["layers"][0]["mlp"]["gate_proj"].sharding.spec),
          "generated": int(expected.lengths.sum())}


# The 8-device checks of tests/parallel/test_sharding.py, with their meshes: one process runs
# them all, sparing the suite an interpreter start and jax's initialisation per check.
EIGHT_DEVICE_CHECKS = {"meshes": (meshes, None), "accum": (accum, "4,1,2"),
                       "sample": (sample, "1,2,4")}


def eight(args):
  return {name: fn(argparse.Namespace(**{**vars(args), "mesh": mesh}))
          for name, (fn, mesh) in EIGHT_DEVICE_CHECKS.items()}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["meshes", "train", "restore", "sample", "accum",
                                       "eight"])
  parser.add_argument("--mesh", default="1,1,1")
  parser.add_argument("--workdir")
  parser.add_argument("--out")
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--coordinator")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  args = parser.parse_args()
  # Added to the suite's XLA flags (tests/conftest.py), not replacing them.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={args.devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  from llmjax.parallel import distributed
  if args.coordinator:
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  result = {"meshes": meshes, "train": train, "restore": restore,
            "sample": sample, "accum": accum, "eight": eight}[args.mode](args)
  if args.mode in ("meshes", "sample", "accum", "eight"):
    print(json.dumps(result))
  elif args.out and (args.process_id or 0) == 0:
    np.savez(args.out, *result.pop("params"))
    with open(args.out + ".json", "w") as f:
      json.dump(result, f)


if __name__ == "__main__":
  main()
