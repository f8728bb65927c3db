"""cuDNN's convolution algorithms chosen by timing them, not by its heuristics (``torch.backends.cudnn.benchmark``).

Convolutions are the second largest share of a compiled SDXL step (205-226 ms of 30 steps at 1024 px on an
H100: BENCHMARKS.md, "Where a compile_graph call's time goes"), and inductor leaves them to cuDNN. By default
cuDNN runs the algorithm its heuristics rank first for each shape; with benchmarking, the first call of each
shape times ``limit`` of its candidates and keeps the fastest for the rest of the process. That first call is a
warmup call (the runner's, or the CUDA graph's capture warmup), so the timed calls and the graphs replay only
chosen algorithms. Algorithms differ in their order of summation, so the images may move by rounding: the
quality metrics against ``none`` say by how much.

The setting is process-wide, and each job runs in a process of its own (runner/worker.py), so it reaches only
the job that asked for it. In place, with no stage: it stands anywhere in a chain.
"""

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target
from runner.config import ConfigError


@dataclass
class CudnnTuningAccelerator(Accelerator):
    limit: int = 10  # how many of cuDNN's candidate algorithms to time per convolution shape; 0: all of them

    def check(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ConfigError(
                f"cuDNN's timed algorithms (CudnnTuningAccelerator) need a CUDA device, not {device.type}: "
                "use device=cuda, or an accelerator without it"
            )
        if self.limit < 0:
            raise ConfigError(
                f"accelerator.limit={self.limit}: the number of algorithms cuDNN times per shape is 0 (all) or more"
            )

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.benchmark_limit = self.limit

    def tags(self) -> dict[str, str]:
        return {"cudnn_benchmark": f"limit {self.limit}" if self.limit else "every algorithm"}
