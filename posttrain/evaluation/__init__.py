"""Evaluation during and after training: held-out objective metrics and scored generations.

Evaluators share one surface, `run(model, step) -> {metric: value}`, which the trainer calls at
the configured steps (`train/trainer.py`); recipes choose which evaluators a run has.
"""
