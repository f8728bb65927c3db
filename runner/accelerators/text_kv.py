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
next to nothing. It now runs as one batched product per set of alike layers (``Batch``: two for SDXL, one per
width of its transformer blocks) instead of one product each, so its host time no longer grows with the
number of blocks: on an H200 host, from an idle GPU, SDXL's 70 fused projections took 0.24 ms against 2.14 ms
one by one, its 140 unfused ones 0.23 ms against 4.33 ms (``benchmarks/call_edges.py``; BENCHMARKS.md, "the
host's work around the steps").
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, DenoiserWrapper, Stage, Target, Wraps
from runner.config import ConfigError
from runner.errors import RunnerError


class TextProjection(torch.nn.Module):
    """A cross-attention's projection of the text, computed by ``fill`` (or by its ``Batch``) and read back by
    every call."""

    def __init__(self, projection: torch.nn.Module) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return getattr(self, _buffer_name(text))

    @torch.no_grad()
    def fill(self, text: torch.Tensor) -> None:
        name = _buffer_name(text)
        if hasattr(self, name):
            getattr(self, name).copy_(self.projection(text))  # in place: a captured graph reads this address
        else:
            self.register_buffer(name, self.projection(text), persistent=False)


class Batch:
    """Projections of the text by ``torch.nn.Linear`` layers of one shape, dtype and device, filled by one batched
    matrix product instead of one product each: their weights are stacked once (each layer's weight becomes its
    slice of the stack, so nothing is held twice) and each projection's buffer is its slice of the product,
    which later fills overwrite where it is."""

    def __init__(self, projections: list[TextProjection]) -> None:
        self.projections = projections
        layers = [projection.projection for projection in projections]
        self.weight = _stacked(layers, "weight")  # (layers, out, in)
        self.bias = _stacked(layers, "bias")
        self.products: dict[str, torch.Tensor] = {}  # (layers, rows, out) per text shape

    @torch.no_grad()
    def fill(self, text: torch.Tensor) -> None:
        rows = text.reshape(1, -1, text.shape[-1]).expand(len(self.projections), -1, -1)
        name, weight = _buffer_name(text), self.weight.transpose(1, 2)
        product = self.products.get(name)
        if product is not None:  # in place: a captured graph reads these addresses
            if self.bias is None:
                torch.bmm(rows, weight, out=product)
            else:
                torch.baddbmm(self.bias, rows, weight, out=product)
            return
        product = torch.bmm(rows, weight) if self.bias is None else torch.baddbmm(self.bias, rows, weight)
        self.products[name] = product
        for projection, projected in zip(self.projections, product, strict=True):
            projection.register_buffer(name, projected.view(*text.shape[:-1], -1), persistent=False)


def _stacked(layers: list[torch.nn.Module], name: str) -> torch.Tensor | None:
    """The layers' parameter ``name`` stacked (biases as (layers, 1, out), to add to each row), each layer's own
    now a view of its slice; None where they have none."""
    parameters = [getattr(layer, name) for layer in layers]
    if parameters[0] is None:
        return None
    stack = torch.stack([parameter.detach() for parameter in parameters])
    for layer, part in zip(layers, stack, strict=True):
        setattr(layer, name, torch.nn.Parameter(part, requires_grad=False))
    return stack.unsqueeze(1) if name == "bias" else stack


def batched(projections: list[TextProjection]) -> list[TextProjection | Batch]:
    """What fills ``projections``: a ``Batch`` for each set of plain linear layers alike (two for SDXL, one per
    width of its transformer blocks), each other projection (a quantised layer, say) on its own."""
    alike: dict[tuple, list[TextProjection]] = {}
    alone: list[TextProjection | Batch] = []
    for projection in projections:
        layer = projection.projection
        if type(layer) is torch.nn.Linear and type(layer.weight) is torch.nn.Parameter:
            key = (tuple(layer.weight.shape), layer.weight.dtype, layer.weight.device, layer.bias is not None)
            alike.setdefault(key, []).append(projection)
        else:
            alone.append(projection)
    return [Batch(group) if len(group) > 1 else group[0] for group in alike.values()] + alone


def _buffer_name(text: torch.Tensor) -> str:
    return "filled_" + "x".join(str(size) for size in text.shape)


class TextOnce(DenoiserWrapper):
    """The denoiser, its cross-attentions' projections filled from the text before a call given new text."""

    def __init__(self, module: torch.nn.Module, projections: list[TextProjection]) -> None:
        super().__init__(module)
        self.projections = projections  # a plain list: they are the denoiser's own submodules already
        self.fillers = batched(projections)
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
            for filler in self.fillers:
                filler.fill(text)
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
        if wrapped is None:
            return {}
        return {"text_kv_projections": str(len(wrapped.projections)), "text_kv_products": str(len(wrapped.fillers))}
