"""The cross-attention's keys and values of the text, computed once per pipeline call instead of at every step.

A text-to-image UNet's cross-attention projects the prompt's embeddings to keys and values in each of its
transformer blocks, at every step, though they depend on the text alone: SDXL runs 70 such projections a step
(105 GFLOP, 3.3% of a 512 px step's, in small matrix products of 154 rows that run far below the GPU's peak).
On an H200 a ``compile_graph_fast`` call took 0.359 s with this against 0.369 s without at 512 px and 0.987 s
against 1.002 s at 1024 px, the same images; the 1024 px profile's product kernel of 1,800 calls (13.2 ms)
was gone (BENCHMARKS.md, "the text's keys once"). Here each cross-attention's projection (``to_kv`` where the
projections were fused, else ``to_k`` and ``to_v``) is replaced by a module that returns what ``fill``
computed, and the denoiser by a wrapper that fills them when it is given text it has not seen: another tensor,
or the same one changed in place (its version counter). The arithmetic is the same, so are the images, up to
the library choosing another kernel for the product alone. ``achieved_tflops`` still counts the projections
at every step (the architecture's FLOPs, as for every accelerator): 3.3% more than run at 512 px for SDXL.

It stands after every other part of a chain (its stage, ``feed``): after torch.compile's fused projections
(which replace the attention processors that call them) and outside the CUDA graph, whose captured steps read
the filled buffers at fixed addresses, one set per text shape. Part of ``compile_graph_fast`` and
``fp8_compile``; not of ``deepcache_compile``, where it was slower (the variant ``dc_text_kv`` in
``benchmarks/conf/accelerator`` says why). The fill runs eagerly: 140 unfused projections from text encoders
that were not graphed took 22 ms before the first step on that H200 host, 70 fused ones from graphed encoders
next to nothing.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, DenoiserWrapper, Stage, Target, Wraps
from runner.config import ConfigError
from runner.errors import RunnerError


class TextProjection(torch.nn.Module):
    """A cross-attention's projection of the text, computed by ``fill`` and read back by every call."""

    def __init__(self, projection: torch.nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return getattr(self, _buffer_name(text))

    @torch.no_grad()
    def fill(self, text: torch.Tensor) -> None:
        projected, name = self.projection(text), _buffer_name(text)
        if hasattr(self, name):
            getattr(self, name).copy_(projected)  # in place: a captured graph reads this address
        else:
            self.register_buffer(name, projected, persistent=False)


def _buffer_name(text: torch.Tensor) -> str:
    return "filled_" + "x".join(str(size) for size in text.shape)


class TextOnce(DenoiserWrapper):
    """The denoiser, its cross-attentions' projections filled from the text before a call given new text."""

    def __init__(self, module: torch.nn.Module, projections: list[TextProjection]) -> None:
        super().__init__(module)
        self.projections = projections  # a plain list: they are the denoiser's own submodules already
        self.text: torch.Tensor | None = None  # the text last filled from, held so its identity stays unique
        self.text_version = -1
        self.fills = 0

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        text = kwargs.get("encoder_hidden_states")
        if not isinstance(text, torch.Tensor):
            raise RunnerError(
                f"text_kv: {type(self.module).__name__} was called without encoder_hidden_states as a keyword, "
                "so the text its cross-attention reads is unknown; use an accelerator without TextKeysOnceAccelerator "
                "among its parts, e.g. accelerator=compile_graph"
            )
        # An inference tensor keeps no version counter: with one, every call fills (correct, and no faster).
        if text.is_inference() or text is not self.text or text._version != self.text_version:
            for projection in self.projections:
                projection.fill(text)
            self.text, self.text_version = text, -1 if text.is_inference() else text._version
            self.fills += 1
        return self.module(*args, **kwargs)


@dataclass
class TextKeysOnceAccelerator(Accelerator):
    wraps: ClassVar[Wraps] = Wraps.DENOISER
    stage: ClassVar[Stage] = Stage.FEED

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        projections = []
        for module in denoiser.modules():
            if not getattr(module, "is_cross_attention", False):
                continue
            names = ("to_kv",) if getattr(module, "fused_projections", False) else ("to_k", "to_v")
            for name in names:
                projection = TextProjection(getattr(module, name))
                setattr(module, name, projection)
                projections.append(projection)
        if not projections:
            raise ConfigError(
                f"accelerator text_kv: {type(denoiser).__name__} has no cross-attention (diffusers' Attention "
                "with is_cross_attention) to compute once; use an accelerator without TextKeysOnceAccelerator among "
                "its parts, e.g. accelerator=compile_graph"
            )
        self.wrapped = TextOnce(denoiser, projections)  # state, not an option: no dataclass field
        setattr(pipe, target.denoiser, self.wrapped)

    def tags(self) -> dict[str, str]:
        wrapped = getattr(self, "wrapped", None)
        return {"text_kv_projections": str(len(wrapped.projections))} if wrapped else {}
