"""Entry point: ``python -m runner [-m] key=value ...`` (see README).

When the jobs will run in this process, the workers' server (runner/launch.py) starts before Hydra composes
and MLflow is imported: its own imports of torch and the rest (9-18 s on our H200 hosts) are what a sweep's
first job waits for, and this way they overlap everything the sweep does before that job.
"""

import sys

from runner.config import CONF, ConfigError
from runner.launch import start_server
from runner.overrides import check_override_keys

# Hydra's flags that print something and run no job.
ASKS_ONLY = {"-h", "--help", "--hydra-help", "--version", "-c", "--cfg", "-i", "--info", "-sc", "--shell-completion"}


def jobs_run_here(arguments: list[str]) -> bool:
    """Whether this process will run jobs, as far as the command line tells: not when it only asks for help or
    a config, nor when it names a launcher other than Hydra's own (SLURM's and local_gpus' jobs start their
    own servers). A launcher chosen in a config file is not seen here: the sweep stops the server then."""
    launcher = [argument.split("=", 1)[1] for argument in arguments if argument.startswith("hydra/launcher=")]
    flags = {argument.split("=", 1)[0] for argument in arguments if argument.startswith("-")}  # --cfg=job too
    return not ASKS_ONLY & flags and launcher in ([], ["basic"])


class WithoutHydraHint:
    """stderr without Hydra's closing hint, which points at a stack trace the runner's errors do not need."""

    def __init__(self, stream: object) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        return len(text) if "HYDRA_FULL_ERROR=1" in text else self.stream.write(text)

    def __getattr__(self, name: str) -> object:
        return getattr(self.stream, name)


def main() -> None:
    arguments = sys.argv[1:]
    overrides = [arg for arg in arguments if not arg.startswith("-") and ("=" in arg or arg.startswith("~"))]
    try:
        check_override_keys(overrides, {folder.name for folder in CONF.iterdir() if folder.is_dir()})
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    if jobs_run_here(arguments):
        start_server()

    import hydra
    from omegaconf import DictConfig

    from runner.job import run_job

    @hydra.main(version_base="1.3", config_path="../conf", config_name="config")
    def run(cfg: DictConfig) -> str:
        return run_job(cfg)

    sys.stderr = WithoutHydraHint(sys.stderr)
    run()


if __name__ == "__main__":
    main()
