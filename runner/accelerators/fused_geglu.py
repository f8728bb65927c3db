"""The feed-forward's GEGLU in one kernel: its matrix product, bias, GELU and gating, where diffusers and inductor
run a product and then an element-wise kernel.

Each of SDXL's 70 transformer blocks starts its feed-forward with ``GEGLU``: one ``Linear`` to twice the inner
width, split in halves, ``hidden * gelu(gate)``. The product writes both halves to memory and a second kernel
reads them back to write the result: on an H200 at 1024 px a ``compile_graph_fast`` call spends 47 ms in that
second kernel (BENCHMARKS.md, "the prompt's encoding as one graph"), about 5% of the call. Here one Triton
kernel computes both halves of an output tile in registers (two accumulators over the same rows of the input,
reading the weight's two halves where ``Linear`` keeps them, so the weights are not copied or reordered), adds
the bias, applies the exact (erf) GELU in float32 and writes only the gated result. The images change by
rounding: the halves are no longer rounded to 16 bits before the GELU.

``runner::geglu`` is a custom operator, so torch.compile keeps it as one call in the graph (and a CUDA graph
captures it); on a CPU or for dtypes other than float16 and bfloat16 it runs diffusers' arithmetic, which is
how the CPU tests check the module swap. Two kernels (``runner/accelerators/geglu_kernels.py``, the option
``kernel``): ``pointers``, and ``tma``, persistent programs fed by Hopper's tensor memory accelerator, built
after ``pointers`` lost. Their configurations are chosen by Triton's autotuner on the first call with a shape
(the runner's warmup, before any capture). Triton ships with CUDA builds of torch; where it is missing on a GPU
machine, the part is refused with the fix.

**Measured slower** with ``pointers``, so in no accelerator (the variant ``cg_fast_geglu`` in
``benchmarks/conf/accelerator``): on an H200 the kernel took 131.6-190.8 µs at 1024 px's product of 8,192 rows
from 640 to 2 x 2,560 columns, against 122.4 µs for cuBLAS's product and inductor's element-wise kernel
together; 109.3-151.2 against 96.1 µs at 2,048 rows from 1,280 to 2 x 5,120; 39.3-51.2 against 29.4-35.6 µs at
512 px (``benchmarks/geglu_kernel.py``). In ``compile_graph_fast`` at 1024 px: 1.0085 s a call against 0.9835 s
(BENCHMARKS.md, "the GEGLU in one kernel"). ``pointers`` ran its product at 491 and 408 TFLOP/s where breaking
even needed 559 and 439 (cuBLAS's Hopper kernels load through TMA in warp-specialised pipelines; ``pointers``
does neither). ``tma`` with Triton's warp specialisation is the first to beat the two passes: 113.6 and 92.0 µs
against 123.5 and 95.4 at 1024 px's two shapes on another H200 start, 34.8 against 35.5 µs at 512 px's larger
shape, but 35.6 against 29.2 µs at its smaller (BENCHMARKS.md, "the fused GEGLU's tma kernel on a GPU"). In
``compile_graph_fast`` at 1024 px it took 1.0-1.6% off a call on three H200 starts, the same images, most of it
the memsets and gaps of the product it replaces; at 512 px, with products of fewer than ``min_rows`` (1,024) rows
left to diffusers' two passes, the same time (BENCHMARKS.md, "the tma kernel beside compile_graph_fast", "the
fused GEGLU in compile_graph_fast"). So ``compile_graph_fast`` holds it with ``kernel=auto``: ``tma`` on Hopper
GPUs, where it was measured, and diffusers' GEGLU on every other device, where nothing was.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.activations import GEGLU

from runner.accelerators import Accelerator, Target, device_named, named_like, require_triton
from runner.config import ConfigError

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def tma_fits(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether Hopper's TMA can address these tensors for the tma kernel: rows contiguous, their starts (and the
    weight's second half's) 16-byte aligned."""
    return (
        all(
            tensor.stride(-1) == 1
            and (tensor.stride(0) * tensor.element_size()) % 16 == 0
            and tensor.data_ptr() % 16 == 0
            for tensor in (x, weight, out)
        )
        and (weight.shape[0] // 2 * weight.stride(0) * weight.element_size()) % 16 == 0
    )


@dataclass(frozen=True)
class Needs:
    """What a kernel needs of the GPU and of its tensors, checked before it runs instead of failing inside it."""

    capability: tuple[int, int] = (0, 0)  # the oldest GPU it runs on
    hardware: str = ""  # what that GPU has, for the refusal
    fits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], bool] | None = None  # the tensors it can read


# The kernels (runner/accelerators/geglu_kernels.py, where Triton is imported) and what each needs.
KERNELS = {
    "pointers": Needs(),
    "tma": Needs((9, 0), "Hopper's tensor memory accelerator", tma_fits),
}


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Diffusers' GEGLU arithmetic: the product, its halves, ``hidden * gelu(gate)``."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@torch.library.custom_op("runner::geglu", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, variant: str = "pointers") -> torch.Tensor:
    """``hidden * gelu(gate)`` of ``x @ weight.T + bias``, halves as diffusers splits them; one Triton kernel
    (``variant``: pointers or tma) on a GPU for float16 and bfloat16. Not named ``kernel``: inductor passes an
    operator's arguments on by name to a function of its own whose first parameter is called that."""
    if x.device.type != "cuda" or x.dtype not in KERNEL_DTYPES:
        return geglu_reference(x, weight, bias)
    from runner.accelerators.geglu_kernels import launch  # imports Triton: on a GPU only

    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], weight.shape[0] // 2, device=x.device, dtype=x.dtype)
    launch(addressable(rows, weight, out, KERNELS[variant].fits), weight, bias, out, variant)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@geglu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, variant: str = "pointers") -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


def addressable(rows: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, fits: Callable | None) -> torch.Tensor:
    """``rows`` as a kernel that reads only what ``fits`` can read them: as they are, or copied into rows of their
    own (a view starting mid-row, strided), so that the run names the kernel it timed, with the copy (the weight
    and ``out`` fit: checked when applied, made by the operator)."""
    if fits is None or fits(rows, weight, out):
        return rows
    return rows.clone(memory_format=torch.contiguous_format)


def fused_forward(self: GEGLU, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if type(self.proj) is not torch.nn.Linear:  # replaced after this part (float8's layers): diffusers' own
        return GEGLU.forward(self, hidden_states, *args, **kwargs)
    if hidden_states.numel() < self.geglu_min_rows * hidden_states.shape[-1]:  # a shape fixed when compiled
        return GEGLU.forward(self, hidden_states, *args, **kwargs)  # fewer rows than the kernel pays at
    return torch.ops.runner.geglu(hidden_states, self.proj.weight, self.proj.bias, self.geglu_kernel)


# What kernel=auto runs: the kernel on the GPUs where it was measured faster than diffusers' two passes in a
# call, by their major compute capability (9: Hopper; BENCHMARKS.md, "the tma kernel beside compile_graph_fast").
# Elsewhere, or where the kernel cannot address a layer's rows, the part leaves every GEGLU to diffusers and
# says so in its tag.
AUTO = {9: "tma"}


def chosen(kernel: str, device: torch.device) -> tuple[str | None, str]:
    """The kernel the option ``kernel`` runs on ``device`` (None: diffusers' own GEGLU) and, where auto steps
    aside, why."""
    if kernel != "auto":
        return kernel, ""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in AUTO:
        return AUTO[torch.cuda.get_device_capability(device)[0]], ""
    runs = ", ".join(f"{name} on compute capability {major}.x" for major, name in AUTO.items())
    return None, f"kernel=auto runs {runs} only, where it was measured faster; not on {device_named(device)}"


@dataclass
class FusedGegluAccelerator(Accelerator):
    kernel: str = "pointers"  # tma, or auto: tma on Hopper GPUs, elsewhere diffusers' GEGLU (AUTO)
    # Products of fewer rows (tokens x batch) than this run diffusers' two passes: on an H200 the tma kernel lost
    # to them at 512 px's 512 rows and beat them at 2,048 and more (BENCHMARKS.md, "the tma kernel beside
    # compile_graph_fast").
    min_rows: int = 0

    def check(self, device: torch.device) -> None:
        if self.kernel not in (*KERNELS, "auto"):
            raise ConfigError(
                f"accelerator.kernel={self.kernel}: fused_geglu's kernels are {', '.join(KERNELS)}, or auto"
            )
        if self.min_rows < 0:
            raise ConfigError(
                f"accelerator.min_rows={self.min_rows}: must be 0 or more (0: the kernel for every product)"
            )
        kernel, _ = chosen(self.kernel, device)
        if device.type != "cuda" or kernel is None:
            return  # diffusers' arithmetic: nothing to import
        needs, capability = KERNELS[kernel], torch.cuda.get_device_capability(device)
        if capability < needs.capability:
            oldest = ".".join(map(str, needs.capability))
            raise ConfigError(
                f"accelerator.kernel={kernel} needs {needs.hardware} (compute capability {oldest} or newer); "
                f"{torch.cuda.get_device_name(device)} has {'.'.join(map(str, capability))}: use kernel=pointers, "
                "or kernel=auto, which leaves diffusers' GEGLU there (as accelerator=compile_graph_fast does)"
            )
        require_triton("fused_geglu", "use an accelerator without FusedGegluAccelerator among its parts")

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        layers = [module for module in denoiser.modules() if isinstance(module, GEGLU)]
        if not layers:
            raise ConfigError(
                f"fused_geglu: {type(denoiser).__name__} has no GEGLU feed-forward to fuse; use an accelerator "
                "without FusedGegluAccelerator among its parts, e.g. accelerator=compile_graph"
            )
        kernel, self.aside = chosen(self.kernel, target.device)
        self.ran, self.fused = kernel, 0
        if kernel is None:
            return
        for layer in layers:
            if type(layer.proj) is not torch.nn.Linear:  # e.g. float8's layer: it must come after this part
                raise ConfigError(
                    f"fused_geglu: a GEGLU's projection is a {type(layer.proj).__name__}, not a torch.nn.Linear; "
                    "put FusedGegluAccelerator before the part that replaced it (fp8), or leave it out"
                )
        unfit = next((layer for layer in layers if not self._fits(kernel, layer, target.dtype)), None)
        if unfit is not None:  # else it fails in the first call
            what = (
                f"{KERNELS[kernel].hardware} cannot address a GEGLU's rows of {unfit.proj.in_features} inputs and "
                f"{unfit.proj.out_features // 2} outputs in {target.dtype}"
            )
            if self.kernel != "auto":
                raise ConfigError(
                    f"accelerator.kernel={kernel}: {what} (each must be a multiple of 16 bytes, the weight "
                    "contiguous); use kernel=pointers"
                )
            self.ran, self.aside = None, f"kernel=auto: {what}"  # auto leaves diffusers' GEGLU there
            return
        for layer in layers:
            # One class per kernel and threshold: they compile differently (precompile's key tells them apart).
            members = {"forward": fused_forward, "geglu_kernel": kernel, "geglu_min_rows": self.min_rows}
            layer.__class__ = named_like(type(layer), f"fused_geglu {self._how(kernel)}", members)
        self.fused = len(layers)

    def _how(self, kernel: str) -> str:
        return kernel + (f", {self.min_rows} rows or more" if self.min_rows else "")

    @staticmethod
    def _fits(kernel: str, layer: GEGLU, dtype: torch.dtype) -> bool:
        """Whether ``kernel`` can run this layer in ``dtype`` (the input and output as the operator makes them:
        rows of the layer's widths)."""
        fits = KERNELS[kernel].fits
        weight = layer.proj.weight.to(dtype)
        x = torch.empty(1, weight.shape[1], dtype=dtype, device="meta")
        out = torch.empty(1, weight.shape[0] // 2, dtype=dtype, device="meta")
        return fits is None or fits(x, weight, out)

    def tags(self) -> dict[str, str]:
        if not hasattr(self, "fused"):
            return {}
        if self.aside:
            return {"fused_geglu": f"none: {self.aside}"}
        return {"fused_geglu": f"{self.fused} ({self._how(self.ran)})"}
