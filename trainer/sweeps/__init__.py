"""Hyperparameter sweeps over a recipe: ``python launch/sweep.py SWEEP.yaml --backend local|slurm|hostfile``."""
