"""One LoRA and one QLoRA train step on 8 simulated CPU devices vs one device (run as a script:
the device count is fixed when jax starts). Prints one JSON line of results per mesh."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
# Added to the suite's XLA flags (tests/conftest.py), not replacing them.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
os.environ["JAX_PLATFORMS"] = "cpu"

import numpy as np  # noqa: E402

from tests.parallel.worker import batches, mesh_of, model_cfg  # noqa: E402


def one_step(policy, mesh, batch):
  """(loss, grad_norm, new trainable leaves, frozen leaf specs) of one step on `mesh`."""
  import jax
  import optax
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train import loop
  from llmjax.train.losses import lm_objective

  rules = mesh_lib.RULE_SETS["fsdp_tensor"]
  graphdef, trainable, frozen, t_shard, f_shard = loop._place_role(policy, mesh, rules)
  tx = optax.adamw(1e-2)
  state = loop.init_train_state({"policy": trainable}, tx)
  b_shard = mesh_lib.batch_sharding(mesh, rules)

  def step(state, frozen, batch):
    with mesh_lib.activation_sharding(mesh, rules):
      return loop.make_train_step({"policy": graphdef}, tx, optax.constant_schedule(1e-2),
                                  lm_objective(), 1)(state, frozen, batch)
  state, m = jax.jit(step)(state, {"policy": frozen},
                           mesh_lib.host_batch_to_global(batch, b_shard))
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(frozen)})
  return (float(m["loss"]), float(m["grad_norm"]),
          [np.asarray(x) for x in jax.tree.leaves(state["params"])], specs)


def main():
  import dataclasses
  import jax
  from flax import nnx
  from llmjax.model import lora, quant
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train.roles import policy_role

  cfg = dataclasses.replace(model_cfg(), tie_embeddings=False)
  base = nnx.state(build_model(cfg, seed=1))
  batch = batches(1)[0]
  variants = {  # name: (config, mesh)
      "lora": (lora.LoraConfig(rank=4, kernel="xla", target_modules=lora.TARGET_MODULES),
               "1,4,2"),
      "qlora": (lora.LoraConfig(rank=4, kernel="xla",
                                quantize_base=quant.QuantConfig("nf4", 32, "reference")), "2,2,2"),
  }
  results = {}
  for name, (lora_cfg, shape) in variants.items():
    policy = policy_role(cfg, base, lora_cfg)
    one_device = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
    ref = one_step(policy, one_device, batch)
    got = one_step(policy, mesh_of(shape), batch)
    results[name] = {
        "loss": got[0], "ref_loss": ref[0], "grad_norm": got[1], "ref_grad_norm": ref[1],
        "param_max_diff": max(float(np.abs(a - b).max()) for a, b in zip(got[2], ref[2])),
        "param_max_change": max(float(np.abs(a).max()) for a in got[2]),
        "frozen_specs": got[3]}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
