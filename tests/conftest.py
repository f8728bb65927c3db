"""Shared fixtures: composing jobs as Hydra does, tiny pipelines, and the real CLI against a temporary store."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import OmegaConf

from runner.config import CONF, ModelConfig

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

    from runner.accelerators import Target

ROOT = CONF.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)


def load_model(name: str) -> ModelConfig:
    model = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    return OmegaConf.to_object(model)


# torch_compile as compile_graph_fast runs it (fused projections, saved compiled functions), on the CPU: aot_eager
# (no inductor), the VAE left eager, no cache shared with other tests.
PRECOMPILED_ON_CPU = {
    "_target_": "runner.accelerators.torch_compile.TorchCompileAccelerator",
    "backend": "aot_eager",
    "fuse_qkv": True,
    "precompile": True,
    "compile_vae": False,
    "cache": False,
}


def cold_then_saved(
    parts: list[dict], target: "Target", model: str = "tiny_sdxl", task: str = "t2i"
) -> Iterator["DiffusionPipeline"]:
    """The tiny ``model``'s ``task`` pipeline with the chain of ``parts`` applied twice from a fresh Dynamo: compiled
    cold, then loaded from the functions the first saved (the chain must save them: PRECOMPILED_ON_CPU among its
    parts); each pipeline is handed over to be checked, and the second must have loaded them."""
    from runner.accelerators.chain import Chain
    from runner.pipelines import build_pipeline

    for _ in range(2):
        torch._dynamo.reset()
        pipe = build_pipeline(load_model(model), task, torch.device("cpu"), torch.float32)
        chain = Chain(parts=parts)
        chain.check(pipe.device)
        chain.apply(pipe, target)
        yield pipe
    assert chain.tags()["precompile_cache"] == "hit"


@dataclass
class Sweep:
    """What a CLI invocation left: its exit code and output, and the runs in its MLflow store."""

    code: int
    output: str
    tracking_uri: str

    def runs(self) -> dict[str, Run]:
        client = MlflowClient(self.tracking_uri)
        experiment = client.get_experiment_by_name("diffusion-bench")
        if experiment is None:
            return {}
        jobs = client.search_runs([experiment.experiment_id], "tags.kind = 'job'")  # not the sweep's own run
        return {run.info.run_name: run for run in jobs}


@pytest.fixture
def cli(tmp_path: Path):
    """Run ``python -m runner ARGS`` like a user would, with its MLflow store and Hydra folders in tmp_path."""
    local = f"sqlite:///{tmp_path}/mlruns/mlflow.db"

    def run(*args: str, env: dict[str, str] | None = None, timeout: int = 600, tracking_uri: str = local) -> Sweep:
        # Its own cache_dir too: the count of jobs at once on this host (and the GPU and core leases) lives
        # there, and the other tests running beside this one are not part of its sweep.
        own_cache = [] if any(arg.startswith("cache_dir=") for arg in args) else [f"cache_dir={tmp_path}/cache"]
        command = [
            sys.executable,
            "-m",
            "runner",
            *args,
            *own_cache,
            f"mlflow.tracking_uri={tracking_uri}",
            f"hydra.sweep.dir={tmp_path}/hydra",
        ]
        result = subprocess.run(
            command,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
        return Sweep(result.returncode, result.stdout + result.stderr, tracking_uri)

    return run


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny SDXL pipeline, built in code with seeded random weights and saved like a hub checkpoint."""
    from runner.pipelines import build_pipeline

    folder = tmp_path_factory.mktemp("tiny_sdxl")
    build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32).save_pretrained(folder)
    return folder


TEST_ACCELERATORS = {  # the tests' own accelerators (tests/fake_accelerators.py), as Hydra options
    "same": "_target_: tests.fake_accelerators.Options\n",
    "perturb": "_target_: tests.fake_accelerators.Perturb\nscale: 0.5\n",
    "blackout": "_target_: tests.fake_accelerators.Blackout\n",
    "crash": "_target_: tests.fake_accelerators.Crash\n",
    "segfault": "_target_: tests.fake_accelerators.Segfault\n",
    "oom": "_target_: tests.fake_accelerators.OutOfMemory\n",
    "wrong_order": (
        "_target_: runner.accelerators.chain.Chain\nparts:\n"
        "  - {_target_: runner.accelerators.torch_compile.TorchCompileAccelerator, backend: eager}\n"
        "  - {_target_: runner.accelerators.deepcache.DeepCacheAccelerator}\n"
    ),
    "dc_eager": (
        "_target_: runner.accelerators.chain.Chain\nparts:\n"
        "  - {_target_: runner.accelerators.deepcache.DeepCacheAccelerator, interval: 3}\n"
        "  - {_target_: runner.accelerators.torch_compile.TorchCompileAccelerator, backend: eager}\n"
    ),
    "fp8_traced": (  # fp8 (per-row scales) then torch.compile, traced without generating code
        "_target_: runner.accelerators.chain.Chain\nparts:\n"
        "  - {_target_: runner.accelerators.float8.Float8Accelerator}\n"
        "  - _target_: runner.accelerators.torch_compile.TorchCompileAccelerator\n"
        "    backend: aot_eager\n    compile_vae: false\n    cache: false\n"
    ),
    "fp8_calibrated": (  # fp8 with calibrated per-tensor scales, eager
        "_target_: runner.accelerators.float8.Float8Accelerator\nscaling: calibrated\n"
    ),
    "vae_traced": (  # the VAE in bfloat16, its decoder traced by torch.compile without generating code
        "_target_: runner.accelerators.chain.Chain\nparts:\n"
        "  - {_target_: runner.accelerators.vae_bf16.VaeBf16Accelerator}\n"
        "  - {_target_: runner.accelerators.torch_compile.TorchCompileAccelerator, backend: aot_eager, cache: false}\n"
    ),
    "bf16_traced": (  # the pipeline in bfloat16, the denoiser and the VAE traced by torch.compile without code
        "_target_: runner.accelerators.chain.Chain\nparts:\n"
        "  - {_target_: runner.accelerators.bf16.Bf16Accelerator}\n"
        "  - {_target_: runner.accelerators.torch_compile.TorchCompileAccelerator, backend: aot_eager, cache: false}\n"
    ),
    "graph_text": "_target_: runner.accelerators.cuda_graph.CudaGraphAccelerator\ntext_encoders: true\n",
    "pre": (
        "_target_: runner.accelerators.torch_compile.TorchCompileAccelerator\n"
        "backend: aot_eager\ncompile_vae: false\ncache: false\nprecompile: true\n"
    ),
    "pre_nested": (  # compile_graph's compile: transformer blocks as nested regions, precompiled
        "_target_: runner.accelerators.torch_compile.TorchCompileAccelerator\n"
        "backend: aot_eager\ncompile_vae: false\ncache: false\nprecompile: true\nnested: true\n"
    ),
}


@pytest.fixture
def test_accelerators(tmp_path: Path) -> str:
    """Puts the tests' own accelerators (same, perturb, blackout, crash, segfault, oom, wrong_order,
    dc_eager, fp8_traced, fp8_calibrated, vae_traced, bf16_traced, graph_text, pre, pre_nested) on Hydra's search
    path, as a user would add theirs without touching conf/; returns that override."""
    folder = tmp_path / "test_conf" / "accelerator"
    folder.mkdir(parents=True)
    for name, text in TEST_ACCELERATORS.items():
        (folder / f"{name}.yaml").write_text(text)
    return f"hydra.searchpath=[file://{folder.parent}]"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def mlflow_server(folder: Path, database: str) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 with ``database`` behind it and proxied artifacts in ``folder``; its URL."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--backend-store-uri", database, "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"]
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
