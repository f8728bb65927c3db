"""Timing a function on the GPU as a step runs it: captured once in a CUDA graph (after warm calls on a side stream,
where an autotuner's timings land) and replayed back to back, the mean per call it holds. The kernel benchmarks'
(folded_attention.py, text_attention.py, memsets.py, geglu_kernel.py, fp8_matmul.py, group_norm.py); a script run
from this folder imports it by name."""

from collections.abc import Callable
from typing import Any

import torch


def captured(function: Callable) -> torch.cuda.CUDAGraph:
    """``function`` called three times on a side stream, then captured once in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        function()
    return graph


def replayed_us(graph: torch.cuda.CUDAGraph, calls: int, replays: int = 30) -> float:
    """Mean µs per call of ``graph``, which holds ``calls`` calls, over ``replays`` replays after 5 untimed."""
    for _ in range(5):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / replays / calls


def device_record() -> dict[str, Any]:
    """What a benchmark's JSON says of where it ran: the GPU's name and UUID, torch's and CUDA's versions."""
    return {
        "name": torch.cuda.get_device_name(),
        "gpu": f"GPU-{torch.cuda.get_device_properties(0).uuid}",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
