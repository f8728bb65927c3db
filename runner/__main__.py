"""Entry point: ``python -m runner [-m] key=value ...`` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from runner.config import CONF, ConfigError, check_override_keys
from runner.job import run_job


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> str:
    return run_job(cfg)


class WithoutHydraHint:
    """stderr without Hydra's closing hint, which points at a stack trace the runner's errors do not need."""

    def __init__(self, stream: object) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return len(text) if "HYDRA_FULL_ERROR=1" in text else self.stream.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


if __name__ == "__main__":
    overrides = [arg for arg in sys.argv[1:] if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    try:
        check_override_keys(overrides, {folder.name for folder in CONF.iterdir() if folder.is_dir()})
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    sys.stderr = WithoutHydraHint(sys.stderr)
    main()
