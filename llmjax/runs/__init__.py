"""Run-level jobs above the model package: loading a run's checkpoint, quantizing a run."""
