"""Starting a job's worker (runner/worker.py) from the job's process (runner/job.py), and what passes between them.

Workers are forked from a server that imported the worker's modules (torch, diffusers, transformers, MLflow,
inductor) once: importing them took 13-18 s a process on our H100 hosts, and forking takes a fraction of a
second. Each job still gets a process of its own, forked from a server that never touched CUDA (a fork would
inherit a broken context: torch's CUDA checks read NVML instead), never loaded a pipeline and never compiled
anything (multiprocessing's forkserver). Where a platform has no fork, each worker is spawned afresh.

This module imports nothing heavy, nor do the sweep's and the job's processes: they start the server first
(``start_server``), and its imports run while they open MLflow and compose their jobs, instead of after.
"""

import contextlib
import ctypes
import gc
import importlib.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from runner.record import Outcome, WorkerResult

RESULT = "result.json"  # the worker's WorkerResult, written last
SWITCHED = "switched.yaml"  # beside the job's config: the job's config at switch_res (runner/config.py)
LAUNCHED_AT = "RUNNER_WORKER_LAUNCHED_AT"  # time.time() when the job's process started the worker
# torch._inductor.compile_fx: 3-4 s at a job's first compile; MLflow's database store: 0.6-1.1 s of each worker's
# setup, imported when the worker opens the tracking database.
PRELOADED = ["runner.worker", "torch._inductor.compile_fx", "mlflow.store.tracking.sqlalchemy_store"]

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # before the server starts: it inherits this
if "forkserver" in multiprocessing.get_all_start_methods():
    WORKERS = multiprocessing.get_context("forkserver")
    WORKERS.set_forkserver_preload(PRELOADED)
else:
    WORKERS = multiprocessing.get_context("spawn")  # type: ignore[assignment]


def start_server() -> None:
    """Start the server that forks workers, if it is not running: it imports the worker's modules in the
    background, and the first worker waits only for what is left of that. Harmless where there is none."""
    if WORKERS.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        forkserver.ensure_running()


def stop_server() -> None:
    """Stop the server if it runs: the entry point started it, but the sweep's launcher runs the jobs
    elsewhere (each job process of SLURM or local_gpus starts its own), so it would only hold memory."""
    if WORKERS.get_start_method() == "forkserver":
        from multiprocessing import forkserver

        server = forkserver._forkserver  # multiprocessing's own, which offers no public way to stop it
        if server._forkserver_pid is not None:
            os.kill(server._forkserver_pid, signal.SIGKILL)  # it reads the request to stop only after its imports
            server._stop()  # reaps it and removes its socket


def missing_bytecode_hint(module: str = "torch", writes_bytecode: bool = not sys.flags.dont_write_bytecode) -> str:
    """One line for a host where Python neither finds ``module``'s bytecode nor may write it (PYTHONDONTWRITEBYTECODE
    set, as many container images do, and no .pyc files shipped): the workers' server then compiles its modules
    from source in every sweep (importing took 20-21 s on our H200 image as it is, 13-18 s with the bytecode kept);
    empty elsewhere."""
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    if writes_bytecode or spec is None or not (spec.origin or "").endswith(".py"):
        return ""
    assert spec.origin is not None
    if Path(importlib.util.cache_from_source(spec.origin)).exists():  # honours PYTHONPYCACHEPREFIX
        return ""
    return (
        f"note: Python finds no bytecode for {module} here and may not write it (PYTHONDONTWRITEBYTECODE is set), so "
        "every sweep compiles its modules again before the first job; to keep them, export "
        "PYTHONPYCACHEPREFIX=$HOME/.cache/pycache and unset PYTHONDONTWRITEBYTECODE"
    )


def launch_worker(folder: Path, gpu: str | None, cores: list[int]) -> tuple[Outcome, str]:
    """Measure in a fresh process that sees only ``gpu`` (if given) and may pin to the first of ``cores`` (the
    others are its siblings, held idle), echoing its output and keeping it in ``worker.log``; return how it
    ended and why."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", LAUNCHED_AT: repr(time.time())}
    env.update({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})
    argv = [str(folder / "config.yaml"), str(folder), ",".join(map(str, cores)), gpu or ""]
    (folder / RESULT).unlink(missing_ok=True)
    reader, writer = WORKERS.Pipe(duplex=False)
    worker = WORKERS.Process(target=run_forked, args=(argv, env, writer), name=f"worker {folder.name}")
    worker.start()
    writer.close()  # the worker holds the only writing end: its exit ends the output
    with open(folder / "worker.log", "w") as log, open(os.dup(reader.fileno()), errors="replace") as output:
        reader.close()
        try:
            for line in output:
                sys.stdout.write(line)
                log.write(line)
            worker.join()
        except BaseException:
            worker.terminate()
            worker.join(timeout=30)
            raise
    code = worker.exitcode
    assert code is not None
    result = WorkerResult.load(folder / RESULT)
    if code == 0:
        return Outcome.OK, ""
    if result is not None and result.error:
        return Outcome.FAILED, result.error
    if code < 0:
        return (
            Outcome.FAILED,
            f"the worker process was killed by {signal.Signals(-code).name} (out of memory?); see worker.log",
        )
    return Outcome.FAILED, f"the worker process exited with code {code}; see worker.log"


def run_forked(argv: list[str], env: dict[str, str], output: Connection) -> None:
    """The worker, as a process forked by the server: the job's environment (its GPU, CUDA_VISIBLE_DEVICES,
    set before anything touches CUDA), its output into ``output``, then the worker's ``main``."""
    _die_with_parent()
    # What the server imported is here for good: out of the collector's sight, so that the collection before
    # the timed calls (runner/worker.py) walks only what the job made (1.4 s for a tiny job on the CPU machine).
    gc.freeze()
    os.environ.clear()
    os.environ.update(env)
    for stream in (1, 2):
        os.dup2(output.fileno(), stream)
    output.close()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    from tqdm import tqdm

    from runner.worker import main  # imported by the server already (spawned: imported here)

    # tqdm's default lock is a multiprocessing semaphore, which the server's resource tracker reports as
    # leaked once a worker ends at once (os._exit): the pipelines' progress bars are off, a thread lock does.
    tqdm.set_lock(threading.RLock())
    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is handed back (result.json, images): skip the interpreter's teardown, which takes seconds
    # with torch, diffusers and a pipeline loaded (timed as the job's worker_exit).
    os._exit(code)


def _die_with_parent() -> None:
    """Be killed if the process that started this one dies, so no orphan holds the GPU (Linux only); the
    server that forks workers ends when the job's process does."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # it died before that took hold
        os._exit(1)
