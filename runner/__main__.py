"""Entry point: ``python -m runner [-m] key=value ...`` (see README)."""

import hydra
from omegaconf import DictConfig

import runner.config  # noqa: F401  (registers the config schema before Hydra composes)
from runner.job import run_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    return run_job(cfg)


if __name__ == "__main__":
    main()
