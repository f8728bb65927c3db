"""One GPU per job: an exclusive lease on a physical GPU.

Jobs launched side by side on one host (``hydra/launcher=local_gpus``) each take one GPU of those visible to
them, wait while all are taken, and never share one. The lease is a lock file per GPU, named by its UUID,
under ``cache_dir/gpu-locks``; it is held while the job's worker runs and released by the operating system
if the process dies. The worker sees only its GPU (``CUDA_VISIBLE_DEVICES`` set to the UUID), so
``device=cuda`` is that GPU; the run's tags ``gpu_uuid`` and ``gpu_host_index`` say which it was. Under SLURM
each job is shown its own GPU already, and the lease simply takes it.
"""

import fcntl
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def nvidia_smi(*fields: str) -> list[list[str]]:
    """One row per GPU of the host with the asked ``--query-gpu`` fields; empty without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [[part.strip() for part in line.split(",")][: len(fields)] for line in out.strip().splitlines() if line]


def visible_gpus() -> list[str]:
    """UUIDs of the GPUs this process may use: nvidia-smi's list, narrowed by CUDA_VISIBLE_DEVICES (indices or
    UUIDs; an empty value hides them all). Empty without nvidia-smi."""
    gpus = nvidia_smi("index", "uuid")
    chosen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is None:
        return [uuid for _, uuid in gpus]
    wanted = [item.strip() for item in chosen.split(",") if item.strip()]
    by_index = dict(gpus)
    return [by_index.get(item, item) for item in wanted if item in by_index or item.startswith("GPU-")]


@contextmanager
def gpu_lease(
    folder: Path, gpus: list[str], wait_s: float = 2.0, waiting: Callable[[], None] = lambda: None
) -> Iterator[str | None]:
    """Hold one of ``gpus`` (UUIDs) exclusively for the block and yield its UUID; None if ``gpus`` is empty.
    While every GPU is held by another job, call ``waiting`` once and retry every ``wait_s`` seconds."""
    if not gpus:
        yield None
        return
    folder.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        for uuid in gpus:
            handle = open(folder / f"{uuid}.lock", "w")  # noqa: SIM115  (held open as the lease itself)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            try:
                yield uuid
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()
            return
        if not told:
            waiting()
            told = True
        time.sleep(wait_s)
