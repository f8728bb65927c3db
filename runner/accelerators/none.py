"""The baseline: plain diffusers, as loaded (PyTorch's scaled-dot-product attention)."""

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline


@dataclass
class NoAccelerator:
    def check(self, device: torch.device) -> None:
        pass

    def apply(self, pipe: DiffusionPipeline) -> None:
        pass

    def tags(self) -> dict[str, str]:
        return {}
