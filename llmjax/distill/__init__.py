"""Knowledge distillation: a frozen teacher's next-token distribution taught to a student.

`losses` holds the divergences as pure jax functions (TRL's generalized JSD, with forward and
reverse KL as its beta = 0 and beta = 1 cases, temperature, optional top-k teacher support) and
`distill_loss`, which mixes them with the next-token loss over packed rows, projecting a few
positions at a time so neither model's `[batch, seq, vocab]` logits exist at full length.
"""
