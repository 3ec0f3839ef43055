"""One DPO step (with a reference role), one reward-model step, one GRPO step (dapo, with a
KL to a reference; DPO and GRPO with chunked log-probs, the vocab split over `tensor`) and one
distill step (a wider teacher, chunked loss, some rows on-policy) on 8 simulated CPU devices,
with 2 microbatches, vs one device without accumulation. Run as a script (the device count
is fixed when jax starts): `mesh_worker.py TOKENIZER_PATH`; prints one JSON line."""

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


def one_step(all_roles, loss_fn, mesh, batch, accum):
  """(metrics, new policy leaves) of one train step of `all_roles` on `mesh`."""
  import jax
  import optax
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.train import loop

  rules = mesh_lib.RULE_SETS["fsdp_tensor"]
  graphdefs, trainables, frozen = {}, {}, {}
  for name, role in all_roles.items():
    graphdefs[name], t, frozen[name], _, _ = loop._place_role(role, mesh, rules)
    if name == "policy" or jax.tree.leaves(t):  # as the loop: PPO's value model trains too
      trainables[name] = t
  # Plain SGD: the update is the gradient itself (Adam's first step would be ~lr for every
  # weight, amplifying summation-order noise in near-zero gradients).
  tx = optax.sgd(1.0)
  state = loop.init_train_state(trainables, tx)
  b_shard = mesh_lib.batch_sharding(mesh, rules)

  def step(state, frozen, batch):
    with mesh_lib.activation_sharding(mesh, rules):
      return loop.make_train_step(graphdefs, tx, optax.constant_schedule(1.0), loss_fn,
                                  accum)(state, frozen, batch)
  state, m = jax.jit(step)(state, frozen, mesh_lib.host_batch_to_global(batch, b_shard))
  return ({k: float(v) for k, v in m.items()},
          [np.asarray(x) for x in jax.tree.leaves(state["params"])])


def main():
  import jax
  from flax import nnx
  from llmjax.data import preferences
  from llmjax.data.tokenizer import Tokenizer
  from llmjax.model.reward import init_reward_model, reward_config
  from llmjax.model.transformer import build_model
  from llmjax.parallel import mesh as mesh_lib
  from llmjax.stages.dpo import PreferenceLoss, preference_objective
  from llmjax.stages.reward_model import reward_objective
  from llmjax.train.roles import Role, policy_role
  from tests.conftest import TEST_MODEL

  tokenizer = Tokenizer.load(sys.argv[1])
  data = preferences.PreferenceDataConfig(seq_len=128, batch_size=8, max_pairs_per_row=2)
  pairs = preferences.builtin_pairs("train", 24)
  examples, _ = preferences.tokenize_pairs(pairs, tokenizer, "chatml", 128, "drop")
  batch = next(iter(preferences.pair_batches_in_order(examples, data)))
  n_pairs = int((batch["pair_index"] >= 0).sum())

  base = nnx.state(build_model(TEST_MODEL, seed=1))
  ref_graphdef, ref_params = nnx.split(build_model(TEST_MODEL, seed=2))
  rm_cfg = reward_config(TEST_MODEL)
  variants = {
      "dpo": ({"policy": policy_role(TEST_MODEL, base),
               "reference": Role.frozen(ref_graphdef, ref_params, TEST_MODEL)},
              # Chunked log-probs (TrainConfig.loss_chunk_size): 128 positions in chunks of
              # 48, the last padded.
              preference_objective(PreferenceLoss(loss_type="sigmoid", beta=0.1), 2, False,
                                   chunk_size=48)),
      "rm": ({"policy": policy_role(rm_cfg, init_reward_model(base, rm_cfg, seed=3))},
             reward_objective(2, center_rewards_coefficient=0.01)),
  }
  # GRPO: 16 completions (4 prompts x G=4) of random tokens with group advantages, a KL
  # to a reference (beta > 0) and dapo's token-level normaliser across the 2 microbatches.
  from llmjax.rl.advantages import group_advantages
  from llmjax.rl.rollouts import training_rows
  from llmjax.stages.grpo import GRPOConfig, grpo_objective
  rng = np.random.default_rng(0)
  lengths = rng.integers(3, 12, (4, 4))
  rollout = training_rows([list(rng.integers(5, 400, 6)) for _ in range(4)],
                          rng.integers(5, 400, (4, 4, 12)), lengths, 24)
  rollout["advantages"] = np.asarray(group_advantages(rng.normal(size=16), 4), np.float32)
  rollout["old_logps"] = np.zeros((16, 24), np.float32)
  rollout["fresh"] = np.ones(16, np.float32)
  grpo_cfg = GRPOConfig(num_generations=4, max_new_tokens=12, loss_type="dapo", beta=0.04)
  variants["grpo"] = ({"policy": policy_role(TEST_MODEL, base),
                       "reference": Role.frozen(ref_graphdef, ref_params, TEST_MODEL)},
                      grpo_objective(grpo_cfg, chunk_size=5))  # the 12-token window in 5s
  batches = {"grpo": rollout}
  # Distill: a wider, deeper teacher; CE mixed in (alpha), chunked over positions, and two
  # rows marked sampled (on-policy: no CE there), one in each microbatch.
  import dataclasses
  from llmjax.data import instructions
  from llmjax.stages.distill import TEACHER, DistillConfig, distill_objective
  sft_data = instructions.SFTDataConfig(seq_len=64, batch_size=8, builtin_train=200)
  convs, _, _ = instructions.conversations(sft_data)
  sft_ex, _ = instructions.tokenize_conversations(convs, tokenizer, "chatml", 64, "drop")
  sft_batch = dict(next(iter(instructions.train_batches(sft_ex, sft_data))))
  sft_batch["sampled"] = np.asarray([0, 1, 0, 0, 1, 0, 0, 0], np.float32)
  teacher_cfg = dataclasses.replace(TEST_MODEL, d_model=96, d_ff=192, n_layers=3)
  teacher = nnx.split(build_model(teacher_cfg, seed=4))
  variants["distill"] = ({"policy": policy_role(TEST_MODEL, base),
                          TEACHER: Role.frozen(*teacher, teacher_cfg)},
                         distill_objective(DistillConfig(beta=0.5, alpha=0.3, temperature=2.0),
                                           chunk_size=16))
  batches["distill"] = sft_batch

  # PPO: the rollout's scoring (reward model, values, KL, GAE, whitening over the whole
  # batch) on the mesh, then a step of policy + value model.
  from llmjax.stages.ppo import PPOConfig, PPORollout, ppo_objective
  from llmjax.train import loop
  ppo_cfg = PPOConfig(kl_coef=0.1, lam=0.9, missing_eos_penalty=1.0)
  rm_graphdef, rm_params = nnx.split(build_model(rm_cfg, seed=4))
  ppo_roles = {"policy": policy_role(TEST_MODEL, base),
               "reference": Role.frozen(ref_graphdef, ref_params, TEST_MODEL),
               "reward": Role.frozen(rm_graphdef, rm_params, rm_cfg),
               "value": policy_role(rm_cfg, init_reward_model(base, rm_cfg, seed=5))}
  ppo_rows = {k: v for k, v in rollout.items() if k not in ("advantages", "old_logps")}
  ppo_rows["stopped"] = (np.arange(16) % 3 > 0).astype(np.float32)

  def ppo_rollout(mesh):
    rules = mesh_lib.RULE_SETS["fsdp_tensor"]
    placed = {name: loop._place_role(role, mesh, rules) for name, role in ppo_roles.items()}
    state = {name: nnx.merge_state(p[1], p[2]) for name, p in placed.items()}
    view = loop.PolicyView(placed["policy"][0], state["policy"], 0,
                           {k: (placed[k][0], state[k]) for k in placed if k != "policy"})
    b = dict(ppo_rows)
    metrics = PPORollout(ppo_cfg, mesh, rules)(view, None, b)
    return b, metrics

  one_device = mesh_lib.make_mesh(mesh_lib.MeshConfig(1, 1, 1), jax.devices()[:1])
  ref_b, ref_rm = ppo_rollout(one_device)
  got_b, got_rm = ppo_rollout(mesh_lib.make_mesh(mesh_lib.MeshConfig(2, 2, 2)))
  ppo_scoring = {"metrics": got_rm, "ref_metrics": ref_rm}
  for k in ("old_logps", "old_values", "advantages", "returns"):
    ppo_scoring[k] = float(np.abs(got_b[k] - ref_b[k]).max() /
                           max(float(np.abs(ref_b[k]).max()), 1e-9))
  variants["ppo"] = (ppo_roles, ppo_objective(ppo_cfg))
  batches["ppo"] = ref_b
  results = {"pairs": n_pairs, "ppo_scoring": ppo_scoring}
  for name, (all_roles, loss_fn) in variants.items():
    b = batches.get(name, batch)
    ref_m, ref_p = one_step(all_roles, loss_fn, one_device, b, accum=1)
    got_m, got_p = one_step(all_roles, loss_fn, mesh_lib.make_mesh(
        mesh_lib.MeshConfig(2, 2, 2)), b, accum=2)
    results[name] = {
        "metrics": got_m, "ref_metrics": ref_m,
        "param_max_diff": max(float(np.abs(a - b).max()) for a, b in zip(got_p, ref_p)),
        "param_max_change": max(float(np.abs(a - b).max()) for a, b in zip(
            ref_p, [np.asarray(x) for x in jax.tree.leaves(
                nnx.split(all_roles["policy"].build(all_roles["policy"].init),
                          all_roles["policy"].trainable, ...)[1])]))}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
