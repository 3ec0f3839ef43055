"""Reinforcement learning for language models: GRPO and its variants, and PPO's math for RLHF.

`advantages` turns per-completion rewards into advantages (GRPO's group baseline, RLOO's
leave-one-out baseline), `policy_loss` holds the clipped policy-gradient loss family (GRPO,
BNPO, Dr. GRPO, DAPO, GSPO) as pure jax functions defined as TRL defines them, `rewards`
the built-in reward functions (math answers, format, length), and `ppo` the pure functions of
PPO with a reward model and a value head (KL-penalised token rewards, GAE, masked whitening,
the clipped policy and value losses, the adaptive KL coefficient) as TRL's PPOTrainer defines
them, except that the score goes on the completion's last real token.
"""
