"""CUDA graphs, no compiler: the denoiser's call captured once and replayed at every step.

Eager diffusers on a GPU is launch-bound (BENCHMARKS.md: an SDXL UNet step takes 57-70 ms to launch
and 17-44 ms to run), so replaying the step's thousands of kernels as one graph removes most of its cost.
One graph is captured per input signature (shapes, dtypes and the non-tensor arguments) on first use,
with static input buffers; each later call copies its inputs into those buffers, replays, and returns a
copy of the outputs. The graph runs the same kernels on the same data as eager execution, so outputs equal
eager ones up to the choice of library algorithms (tests compare them).

A denoiser that picks its path per step in Python (DeepCache) names its ``step_modules``: each is captured
on its own and the routing between them stays in Python. All graphs of a job share one memory pool: they
replay one at a time on one stream and keep their outputs alive, so their scratch memory can be shared.

With ``text_encoders``, the pipeline's text encoders (its components that are transformers models) are
captured too: eager, they launch about 30 ms of kernels that run for 2.5 ms on an H100 (BENCHMARKS.md,
"Where a compile_graph call's time goes"), paid once per call before the first step.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from runner.accelerators import Accelerator, DenoiserWrapper, Stage, Target, Wraps, input_signature, number_as_tensor
from runner.config import ConfigError


class MemoryPool:
    """One CUDA graph memory pool, made at the first capture that asks for it."""

    def __init__(self) -> None:
        self._handle: tuple | None = None

    def handle(self) -> tuple:
        if self._handle is None:
            self._handle = torch.cuda.graph_pool_handle()
        return self._handle


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[Any]  # the static buffers (tensors) and the fixed non-tensor arguments, flattened
    output: Any


class GraphedModule(DenoiserWrapper):
    """Wraps a module so that its calls replay CUDA graphs."""

    def __init__(self, module: torch.nn.Module, warmup_calls: int, pool: "MemoryPool | None" = None) -> None:
        super().__init__(module)
        self.warmup_calls = warmup_calls
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = pool or MemoryPool()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        flat = [number_as_tensor(value, self.module) for value in flat]
        signature = input_signature(flat, spec)
        entry = self.graphs.get(signature)
        if entry is None:
            entry = self.graphs[signature] = self._capture(flat, spec)
        for static, value in zip(entry.inputs, flat, strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        entry.graph.replay()
        return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, entry.output)

    def _capture(self, flat: list[Any], spec: Any) -> _Graph:
        # Contiguous static buffers, whatever the first call's layout: each replay's copy into them converts,
        # and a precompiled module inside then sees one layout (runner/accelerators/precompile.py)
        inputs = [v.clone(memory_format=torch.contiguous_format) if isinstance(v, torch.Tensor) else v for v in flat]
        args, kwargs = tree_unflatten(inputs, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # eager calls first, so libraries pick and allocate their algorithms
            for _ in range(self.warmup_calls):
                self.module(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool.handle()):
            output = self.module(*args, **kwargs)
        return _Graph(graph, inputs, output)


@dataclass
class CudaGraphAccelerator(Accelerator):
    warmup_calls: int = 2  # eager calls on a side stream before each capture
    text_encoders: bool = False  # capture the text encoders' calls too

    wraps: ClassVar[Wraps] = Wraps.DENOISER
    stage: ClassVar[Stage] = Stage.CAPTURE

    def check(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ConfigError(
                f"accelerator=cuda_graph needs a CUDA device, not device={device.type}; use accelerator=none here"
            )

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        if self.text_encoders and not text_encoder_names(pipe):
            raise ConfigError(
                f"accelerator.text_encoders=true: {type(pipe).__name__} has no text encoder (no transformers "
                "model among its components); use accelerator.text_encoders=false"
            )
        denoiser = getattr(pipe, target.denoiser)
        pool = MemoryPool()
        self.graphed = []  # state, not an option: no dataclass field
        parts = getattr(denoiser, "step_modules", ())
        captured = [(denoiser, part) for part in parts] if parts else [(pipe, target.denoiser)]
        for owner, name in captured:
            graphed = GraphedModule(getattr(owner, name), self.warmup_calls, pool)
            setattr(owner, name, graphed)
            self.graphed.append(graphed)
        if self.text_encoders:
            self.graphed += graph_text_encoders(pipe, self.warmup_calls, pool)

    def tags(self) -> dict[str, str]:
        return {"cuda_graphs_captured": str(sum(len(graphed.graphs) for graphed in getattr(self, "graphed", ())))}


def graph_text_encoders(pipe: DiffusionPipeline, warmup_calls: int, pool: MemoryPool) -> list[GraphedModule]:
    """Each of the pipeline's text encoders replaced by a wrapper that captures and replays its calls."""
    graphed = []
    for name in text_encoder_names(pipe):
        graphed.append(GraphedModule(getattr(pipe, name), warmup_calls, pool))
        setattr(pipe, name, graphed[-1])
    return graphed


def text_encoder_names(pipe: DiffusionPipeline) -> list[str]:
    """The pipeline's components that are transformers models: its text encoders (CLIP's, T5's)."""
    from transformers import PreTrainedModel

    return [name for name, part in pipe.components.items() if isinstance(part, PreTrainedModel)]
