"""Preference optimisation: the DPO loss family, SimPO, ORPO and the reward-model loss.

`losses` holds them as pure jax functions over per-sequence log-probabilities, defined as TRL
defines them so that a run moved from TRL gets the same numbers.
"""
