"""What a measurement ran on: device, driver, library versions and the project's commit, as run tags."""

import os
import platform
import subprocess
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from runner.gpus import nvidia_smi

PROJECT = Path(__file__).resolve().parents[1]


def environment_tags(device: torch.device) -> dict[str, str]:
    tags = {
        "device_type": device.type,
        "cpu_name": _cpu_name(),
        "python_version": platform.python_version(),
        "git_commit": _git("rev-parse", "HEAD") or "unknown",
        "git_dirty": str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower(),
        "git_tree": _working_tree() or "unknown",
    }
    for package in ("torch", "diffusers", "transformers", "mlflow", "hydra-core"):
        tags[f"{package.replace('-', '_')}_version"] = _version(package)
    if tags["mlflow_version"] == "not installed":  # the same module, from the client-only distribution
        tags["mlflow_version"] = _version("mlflow-skinny")
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        properties = torch.cuda.get_device_properties(index)
        uuid = getattr(properties, "uuid", None)
        gpu_uuid = f"GPU-{uuid}" if uuid else "unknown"
        tags.update(
            device_name=properties.name,
            device_index=str(index),  # as this process sees it: 0 when leased one GPU
            gpu_uuid=gpu_uuid,
            cuda_version=str(torch.version.cuda),
            **_nvidia_smi_facts(gpu_uuid),
        )
    else:
        tags["device_name"] = tags["cpu_name"]
    return tags


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _nvidia_smi_facts(gpu_uuid: str) -> dict[str, str]:
    """The GPU's index among all of the host's (whatever this process is shown) and the driver's version."""
    facts = {"gpu_host_index": "unknown", "driver_version": "unknown"}
    for index, uuid, driver in nvidia_smi("index", "uuid", "driver_version"):
        facts["driver_version"] = driver
        if uuid == gpu_uuid:
            facts["gpu_host_index"] = index
    return facts


def _working_tree() -> str | None:
    """The git tree id of the project's tracked files as they are, edits included. It equals a commit's tree
    (``git rev-parse COMMIT^{tree}``) exactly when the code that ran is that commit's, so a run from an edited
    checkout, or from a copy whose ``.git`` lags its files (as a GPU machine's may), still names the commit that
    holds its code, unless that commit also added files the lagging ``.git`` does not track: those are left out
    (on 2026-12-04 a commit holding new raw results read as that commit's tree less their folder). Hashed
    through a throwaway index: the checkout's own index is left as it was."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "GIT_INDEX_FILE": str(Path(folder) / "index")}
        if _git("read-tree", "HEAD", env=env) is None or _git("add", "--update", env=env) is None:
            return None
        return _git("write-tree", env=env)


def _git(*args: str, env: dict[str, str] | None = None) -> str | None:
    """git's output in the project's folder; None where git is missing or fails (not a checkout)."""
    try:
        return subprocess.run(
            ["git", "-C", str(PROJECT), *args], capture_output=True, text=True, timeout=10, check=True, env=env
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
