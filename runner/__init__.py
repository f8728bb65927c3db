"""Diffusion pipeline benchmarks: Hydra-composed jobs, measured in fresh processes, logged to MLflow."""
