"""Reinforcement learning from verifiable rewards: GRPO and its variants.

`advantages` turns per-completion rewards into advantages (GRPO's group baseline, RLOO's
leave-one-out baseline), `policy_loss` holds the clipped policy-gradient loss family (GRPO,
BNPO, Dr. GRPO, DAPO, GSPO) as pure jax functions defined as TRL defines them, and `rewards`
the built-in reward functions (math answers, format, length).
"""
