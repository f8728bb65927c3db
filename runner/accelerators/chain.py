"""Accelerators applied one after another, e.g. DeepCache then torch.compile (conf/accelerator/deepcache_compile.yaml).

Each part is an accelerator's options, as in its own YAML. Parts are applied in order; each part refuses,
with the reason, an order it cannot follow (torch_compile after cuda_graph, deepcache after anything),
and an accelerator that owns the whole pipeline (``composes = False``, OneDiff) refuses to be chained.
"""

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target, build_accelerator
from runner.config import ConfigError


@dataclass
class Chain(Accelerator):
    parts: list[dict[str, Any]] = field(default_factory=list)

    def _accelerators(self) -> list[Accelerator]:
        if not hasattr(self, "built"):
            self.built = [build_accelerator(part) for part in self.parts]
        return self.built

    def check(self, device: torch.device) -> None:
        if len(self.parts) < 2:
            raise ConfigError(f"accelerator.parts has {len(self.parts)} part(s): a chain needs at least two")
        for accelerator in self._accelerators():
            if not accelerator.composes:
                raise ConfigError(
                    f"accelerator {type(accelerator).__name__} owns the whole pipeline and cannot "
                    "be chained with others; run it on its own"
                )
            accelerator.check(device)

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        for accelerator in self._accelerators():
            accelerator.apply(pipe, target)

    def warmed_up(self, pipe: DiffusionPipeline) -> None:
        for accelerator in self._accelerators():
            accelerator.warmed_up(pipe)

    def tags(self) -> dict[str, str]:
        return {key: value for accelerator in self._accelerators() for key, value in accelerator.tags().items()}

    def metrics(self) -> dict[str, float]:
        return {key: value for accelerator in self._accelerators() for key, value in accelerator.metrics().items()}
