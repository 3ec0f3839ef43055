"""Pipeline-parallel runs for tests/parallel/test_pipeline_parallel.py, in a fresh process
with 8 simulated CPU devices (the device count is fixed when jax starts).

  python tests/parallel/pipeline_worker.py equal    # pipelined == one device, per schedule
  python tests/parallel/pipeline_worker.py resume --workdir=W   # stage 2 -> stage 4 resume
"""

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# 4 layers, so that 4 stages (or 2 stages x 2 circular rounds) get one layer each.
MODEL = dict(vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64,
             max_seq_len=32)
ROWS, SEQ = 8, 16

# name -> MeshConfig fields: every mesh uses all 8 devices.
CASES = {
    "gpipe_stage2_data4": dict(stage=2, data=4, num_microbatches=4),
    "gpipe_stage4_fsdp2": dict(stage=4, data=1, fsdp=2, num_microbatches=4),
    "gpipe_stage2_data2_tensor2": dict(stage=2, data=2, tensor=2, num_microbatches=2),
    "circular_stage2_data4": dict(stage=2, data=4, num_microbatches=2,
                                  pipeline_schedule="circular", circular_repeats=2),
}


def batches(n=1, rows=ROWS):
  """Random tokens, each row two packed documents (so segment ids and positions matter)."""
  rng = np.random.default_rng(0)
  seg = np.where(np.arange(SEQ) < 10, 1, 2).astype(np.int32)
  pos = np.where(np.arange(SEQ) < 10, np.arange(SEQ), np.arange(SEQ) - 10).astype(np.int32)
  out = []
  for _ in range(n):
    tokens = rng.integers(4, MODEL["vocab_size"], (rows, SEQ + 1), dtype=np.int32)
    mask = np.ones((rows, SEQ), np.int32)
    mask[1, 5:] = 0  # unequal microbatches
    out.append({"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
                "segment_ids": np.tile(seg, (rows, 1)), "positions": np.tile(pos, (rows, 1))})
  return out


def equal(_):
  """Loss and gradients of each pipelined case vs the plain model on one device."""
  import dataclasses
  import jax
  from flax import nnx
  from llmjax.model.config import ModelConfig
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train.losses import lm_loss

  cfg = ModelConfig(**MODEL)
  graphdef, params = nnx.split(build_model(cfg, seed=0))
  # The pipelined model rematerializes its blocks: remat composes with the pipeline.
  remat_graphdef = nnx.split(build_model(dataclasses.replace(cfg, remat="full"), seed=0))[0]
  batch = batches()[0]

  def loss_and_grads(gd):
    def f(p, b):
      return jax.value_and_grad(lambda q: lm_loss(nnx.merge(gd, q), b)[0])(p)
    return f

  one = jax.devices()[0]
  ref_loss, ref_grads = jax.jit(loss_and_grads(graphdef))(jax.device_put(params, one),
                                                          jax.device_put(batch, one))
  results = {}
  for name, fields in CASES.items():
    mesh_cfg = mesh_lib.MeshConfig(**fields)
    mesh, rules = mesh_lib.make_mesh(mesh_cfg), mesh_lib.RULE_SETS["fsdp_tensor"]
    pipeline = mesh_cfg.pipeline()
    p_shard = mesh_lib.param_shardings(params, mesh, rules)
    b_shard = mesh_lib.batch_sharding(mesh, rules)

    def fn(p, b):
      with mesh_lib.activation_sharding(mesh, rules, pipeline):
        return loss_and_grads(remat_graphdef)(p, b)
    args = (jax.device_put(params, p_shard), jax.device_put(batch, b_shard))
    compiled = jax.jit(fn, in_shardings=(p_shard, b_shard)).lower(*args).compile()
    loss, grads = compiled(*args)
    hlo = compiled.as_text()
    results[name] = {
        "loss": float(loss), "ref_loss": float(ref_loss),
        "grad_max_abs_diff": max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                                 for a, b in zip(jax.tree.leaves(grads),
                                                 jax.tree.leaves(ref_grads))),
        "grad_max_abs": max(float(np.abs(np.asarray(g)).max())
                            for g in jax.tree.leaves(ref_grads)),
        # Activations move between stages as collective permutes, in one scan of ticks.
        "collective_permutes": hlo.count("collective-permute-start")
        + hlo.count("collective-permute("),
        "ticks": pipeline.ticks,
        "scan_of_ticks": f"length={pipeline.ticks}" in str(jax.make_jaxpr(fn)(*args)),
        "mesh": dict(mesh.shape)}
  results["sampler"] = sample_on_stage_mesh(graphdef, params)
  return results


def sample_on_stage_mesh(graphdef, params):
  """Greedy generation on a (stage=2, fsdp=2, tensor=2) mesh, under the run's pipeline
  context as RL rollouts are, vs one device: generation does not pipeline, the stage axis
  replicates it."""
  import jax
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.sample.sampler import Sampler

  rng = np.random.default_rng(1)
  prompts = [rng.integers(4, MODEL["vocab_size"], n).tolist() for n in (5, 11, 3, 8)]
  kwargs = dict(max_new_tokens=8, num_samples=2, temperature=0.0)
  expected = Sampler(graphdef, jax.device_put(params, jax.devices()[0]), eos_ids=[3],
                     pad_id=0).sample(prompts, **kwargs)
  mesh_cfg = mesh_lib.MeshConfig(stage=2, data=1, fsdp=2, tensor=2)
  mesh, rules = mesh_lib.make_mesh(mesh_cfg), mesh_lib.RULE_SETS["fsdp_tensor"]
  sharded = jax.device_put(params, mesh_lib.param_shardings(params, mesh, rules))
  with mesh_lib.activation_sharding(mesh, rules, mesh_cfg.pipeline()):
    got = Sampler(graphdef, sharded, eos_ids=[3], pad_id=0).sample(prompts, **kwargs)
  return {"tokens_equal": bool((got.tokens == expected.tokens).all()),
          "logprob_max_diff": float(np.abs(got.logprobs - expected.logprobs).max()),
          "generated": int(expected.lengths.sum())}


def resume(args):
  """The real loop, grad accumulation 2 x 2 pipeline microbatches: 2 steps on stage=2, then
  resumed on stage=4 to step 4; against 4 steps without pipelining (stage=1)."""
  import grain
  import jax
  from llmjax import metrics
  from llmjax.model.config import ModelConfig
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective
  from llmjax.train.optimizer import OptimizerConfig
  from llmjax.train.roles import policy_role

  def run(workdir, stage, stop_after=None):
    mesh_cfg = mesh_lib.MeshConfig(stage=stage, data=-1, num_microbatches=2)
    writer = metrics.MetricsWriter(workdir, "pretrain", 4)
    data = grain.MapDataset.source(batches(4)).to_iter_dataset()
    result = loop.train(
        stage="pretrain", workdir=workdir, policy=policy_role(ModelConfig(**MODEL)),
        loss_fn=lm_objective(), train_data=data, eval_data=[],
        train_cfg=loop.TrainConfig(total_steps=4, grad_accum_steps=2, log_every=1,
                                   eval_every=100, checkpoint_every=2),
        opt_cfg=OptimizerConfig(learning_rate=1e-2, warmup_steps=1), writer=writer,
        mesh=mesh_lib.make_mesh(mesh_cfg), rules="fsdp_tensor",
        pipeline=mesh_cfg.pipeline(), stop_after=stop_after, meta={"tokenizer": None})
    writer.close()
    records = [r for r in metrics.read_metrics(workdir) if r["kind"] == "train"]
    return result, records

  plain, plain_records = run(os.path.join(args.workdir, "plain"), 1)
  moved = os.path.join(args.workdir, "moved")
  run(moved, 2, stop_after=2)
  resumed, records = run(moved, 4)
  leaves = lambda r: [np.asarray(x) for x in jax.tree.leaves(r.params)]
  start = [np.asarray(v) for v in jax.tree.leaves(loop.init_params(ModelConfig(**MODEL), 0)[1])]
  return {"step": resumed.step,
          "q_proj_spec": str(resumed.params["layers"][0]["attn"]["q_proj"].sharding.spec),
          "loss": [r["loss"] for r in records],
          "plain_loss": [r["loss"] for r in plain_records],
          "bubble": [r.get("pipeline_bubble") for r in records],
          "param_max_abs_diff": max(float(np.abs(x - y).max())
                                    for x, y in zip(leaves(resumed), leaves(plain))),
          "param_change": max(float(np.abs(x - y).max())
                              for x, y in zip(leaves(plain), start))}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["equal", "resume"])
  parser.add_argument("--workdir")
  args = parser.parse_args()
  # Added to the suite's XLA flags (tests/conftest.py), not replacing them.
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8")
  os.environ["JAX_PLATFORMS"] = "cpu"
  print(json.dumps({"equal": equal, "resume": resume}[args.mode](args)))


if __name__ == "__main__":
  main()
