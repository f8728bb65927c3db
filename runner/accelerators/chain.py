"""Accelerators applied one after another, e.g. DeepCache then torch.compile (conf/accelerator/deepcache_compile.yaml).

Each part is an accelerator's options, as in its own YAML. Parts are applied in order. The order is checked
from what each part's class declares, before any model is loaded: parts with a stage must stand in the order
of their stages (quantize, restructure, compile, capture, feed; each once), a part that must come first (the
bfloat16 pipeline) does, and a part that owns the whole pipeline (OneDiff) cannot be chained at all.
"""

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Target, Wraps, build_accelerator
from runner.config import ConfigError


@dataclass
class Chain(Accelerator):
    parts: list[dict[str, Any]] = field(default_factory=list)

    def _accelerators(self) -> list[Accelerator]:
        if not hasattr(self, "built"):
            self.built = [build_accelerator(part, f"accelerator.parts.{i}") for i, part in enumerate(self.parts)]
        return self.built

    def check(self, device: torch.device) -> None:
        if len(self.parts) < 2:
            raise ConfigError(f"accelerator.parts has {len(self.parts)} part(s): a chain needs at least two")
        check_order(self._accelerators())
        self._each_part(lambda part: part.check(device))

    def check_dtype(self, dtype: torch.dtype) -> None:
        self._each_part(lambda part: part.check_dtype(dtype))

    def _each_part(self, check: Callable[[Accelerator], None]) -> None:
        """``check`` on each part; a part's refusal names the part and says it stands in this chain."""
        for i, accelerator in enumerate(self._accelerators()):
            try:
                check(accelerator)
            except ConfigError as error:  # name the part's option where it is set (it writes accelerator.kernel=...)
                said = str(error)
                if said.startswith("accelerator."):
                    said = f"accelerator.parts.{i}.{said.removeprefix('accelerator.')}"
                raise ConfigError(f"a part of this chain, {type(accelerator).__name__}: {said}") from error

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        for accelerator in self._accelerators():
            accelerator.apply(pipe, target)

    def warmed_up(self, pipe: DiffusionPipeline) -> None:
        for accelerator in self._accelerators():
            accelerator.warmed_up(pipe)

    def warmup_note(self) -> str:
        return "; ".join(note for accelerator in self._accelerators() if (note := accelerator.warmup_note()))

    def tags(self) -> dict[str, str]:
        return {key: value for accelerator in self._accelerators() for key, value in accelerator.tags().items()}

    def metrics(self) -> dict[str, float]:
        return {key: value for accelerator in self._accelerators() for key, value in accelerator.metrics().items()}


def check_order(parts: list[Accelerator]) -> None:
    """Raise ConfigError, naming the parts and the rule, if ``parts`` cannot be applied in this order."""
    for part in parts:
        if part.wraps is Wraps.PIPELINE:
            raise ConfigError(
                f"accelerator {type(part).__name__} compiles the whole pipeline and cannot be chained with "
                "others; run it on its own"
            )
    for index, part in enumerate(parts):
        if part.first and index:
            raise ConfigError(
                f"accelerator.parts: {type(part).__name__} changes what every other part finds and must be the "
                f"chain's first part, not part {index}"
            )
    staged = [part for part in parts if part.stage is not None]
    for before, after in itertools.pairwise(staged):
        if after.stage <= before.stage:
            raise ConfigError(
                f"accelerator.parts: {type(after).__name__} ({after.stage.name.lower()}) cannot follow "
                f"{type(before).__name__} ({before.stage.name.lower()}): staged parts go in the order quantize "
                "(fp8), restructure (deepcache), compile (torch_compile), capture (cuda_graph), feed (text_kv), each "
                "once"
            )
