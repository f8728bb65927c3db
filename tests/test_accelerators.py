"""Accelerators: each refuses clearly where it cannot run, and each lossless one gives the baseline's outputs
within rounding (on a GPU where it needs one)."""

import pytest
import torch
from conftest import load_model

from runner.accelerators import build_accelerator
from runner.accelerators.cuda_graph import GraphedModule
from runner.config import ConfigError
from runner.pipelines import build_pipeline


def test_cuda_graph_refuses_the_cpu_in_one_line() -> None:
    accelerator = build_accelerator({"_target_": "runner.accelerators.cuda_graph.CudaGraphAccelerator"})
    with pytest.raises(ConfigError, match=r"^accelerator=cuda_graph needs a CUDA device, not device=cpu; use "):
        accelerator.check(torch.device("cpu"))


def test_graphed_module_looks_like_the_module_to_the_pipeline() -> None:
    unet = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cpu"), torch.float32).unet
    graphed = GraphedModule(unet, warmup_calls=1)
    assert graphed.config is unet.config and graphed.dtype == torch.float32
    assert graphed.add_embedding is unet.add_embedding and graphed.graphs == {}


def unet_inputs(seed: int, batch: int = 2, size: int = 8) -> tuple[tuple, dict]:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float16)

    added = {"text_embeds": randn(batch, 32), "time_ids": randn(batch, 6)}
    args = (randn(batch, 4, size, size), torch.tensor(seed * 37.0 % 999, device="cuda"))
    return args, {"encoder_hidden_states": randn(batch, 77, 64), "added_cond_kwargs": added, "return_dict": False}


@pytest.mark.gpu
def test_graph_replay_equals_eager_on_fresh_inputs() -> None:
    unet = build_pipeline(load_model("tiny_sdxl"), "t2i", torch.device("cuda"), torch.float16).unet
    graphed = GraphedModule(unet, warmup_calls=2)
    with torch.no_grad():
        for seed in range(4):  # new inputs every call: replay must compute the same function, not echo
            args, kwargs = unet_inputs(seed)
            expected = unet(*args, **kwargs)[0]
            got = graphed(*args, **kwargs)[0]
            torch.testing.assert_close(got, expected, rtol=2e-3, atol=2e-3)
        assert len(graphed.graphs) == 1
        args, kwargs = unet_inputs(9, batch=1)  # another shape: a second graph
        torch.testing.assert_close(graphed(*args, **kwargs)[0], unet(*args, **kwargs)[0], rtol=2e-3, atol=2e-3)
        assert len(graphed.graphs) == 2


@pytest.mark.gpu
def test_cuda_graph_sweep_matches_the_baseline_images(cli) -> None:
    sweep = cli("-m", "accelerator=none,cuda_graph", "device=cuda", "res=64", "runs=3")
    assert sweep.code == 0, sweep.output
    graphed = sweep.runs()["tiny_sdxl/t2i/64/cuda_graph"]
    assert graphed.data.tags["cuda_graphs_captured"] == "1"
    assert graphed.data.metrics["ssim_vs_baseline"] >= 0.99 and graphed.data.tags["quality_unaffected"] == "true"
