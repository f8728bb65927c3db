"""The baseline: plain diffusers, as loaded (PyTorch's scaled-dot-product attention)."""

from dataclasses import dataclass

from runner.accelerators import Accelerator


@dataclass
class NoAccelerator(Accelerator):
    pass
