"""Stages of the pipeline. Each module exposes `run(params, ...)`, which the CLI calls and which
is the only place that ties data / model code to tracking."""
