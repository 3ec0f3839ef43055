"""Scaling laws: plan a run from a compute budget (laws, plan), measure them (sweep, fit)."""
