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
how the CPU tests check the module swap. The kernel's block sizes are chosen by Triton's autotuner on the first
call with a shape (the runner's warmup, before any capture). Triton ships with CUDA builds of torch; where it
is missing on a GPU machine, the part is refused with the fix.

**Measured slower**, so in no accelerator (the variant ``cg_fast_geglu`` in ``benchmarks/conf/accelerator``): on
an H200 the kernel took 131.6-190.8 µs at 1024 px's product of 8,192 rows from 640 to 2 x 2,560 columns, against
122.4 µs for cuBLAS's product and inductor's element-wise kernel together; 109.3-151.2 against 96.1 µs at 2,048
rows from 1,280 to 2 x 5,120; 39.3-51.2 against 29.4-35.6 µs at 512 px (``benchmarks/geglu_kernel.py``). In
``compile_graph_fast`` at 1024 px: 1.0085 s a call against 0.9835 s (BENCHMARKS.md, "the GEGLU in one kernel").
The element-wise pass costs less than this kernel's product loses to cuBLAS's (at best 491 TFLOP/s, against 699
for cuBLAS's product alone on an earlier H200 start): a fused kernel would have to keep its product within about
10% of cuBLAS's, which plain Triton loads and ``tl.dot`` do not (cuBLAS's Hopper kernels load through TMA in
warp-specialised pipelines; this one does neither).
"""

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.activations import GEGLU

from runner.accelerators import Accelerator, Target, named_like
from runner.config import ConfigError

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def geglu_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Diffusers' GEGLU arithmetic: the product, its halves, ``hidden * gelu(gate)``."""
    hidden, gate = F.linear(x, weight, bias).chunk(2, dim=-1)
    return hidden * F.gelu(gate)


@torch.library.custom_op("runner::geglu", mutates_args=())
def geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``hidden * gelu(gate)`` of ``x @ weight.T + bias``, halves as diffusers splits them; one Triton kernel on a
    GPU for float16 and bfloat16."""
    if x.device.type != "cuda" or x.dtype not in KERNEL_DTYPES:
        return geglu_reference(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], weight.shape[0] // 2, device=x.device, dtype=x.dtype)
    launch(rows, weight, bias, out)
    return out.reshape(*x.shape[:-1], out.shape[-1])


@geglu.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, **config: int) -> None:
    """Run the kernel on 2-D ``x`` into ``out``; ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps,
    num_stages) fixes its block sizes instead of the autotuner's choice (benchmarks/geglu_kernel.py)."""
    rows, depth = x.shape
    width = out.shape[1]
    kernel = triton_kernels()[0 if not config else 1]

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (-(-rows // meta["BLOCK_M"]) * -(-width // meta["BLOCK_N"]),)

    kernel[grid](
        x, weight, weight if bias is None else bias, out, rows, width, depth,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, **config,
    )  # fmt: skip


# Block sizes the autotuner times on a shape's first call: the wide tiles Hopper's tensor cores want for
# SDXL's products (2,048-8,192 rows at 1024 px), and narrower ones for fewer rows (512 px's 512-2,048).
CONFIGS = [
    # BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps
    (128, 128, 64, 3, 8),
    (128, 128, 64, 4, 8),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 4, 8),
    (64, 64, 64, 4, 4),
]


@functools.cache
def triton_kernels() -> tuple[Any, Any]:
    """The kernel autotuned, and as it is (for given block sizes); Triton imported on first use only."""
    import triton
    import triton.language as tl

    @triton.jit
    def geglu_kernel(
        x, w, b, out, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):  # fmt: skip
        # Tiles in groups of GROUP_M rows, so that tiles running together share the weight's columns in L2.
        pid = tl.program_id(0)
        tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        group = pid // (GROUP_M * tiles_n)
        first_m = group * GROUP_M
        group_m = min(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_m
        pid_n = (pid % (GROUP_M * tiles_n)) // group_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        # Out-of-range rows and columns read in-range ones (wrapped) and are never stored: no masks on loads.
        rows_in = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
        cols_in = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        x_at = x + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk
        hidden_at = w + cols_in[None, :] * stride_wn + ks[:, None] * stride_wk  # the weight's first half,
        gate_at = hidden_at + N * stride_wn  # and its second
        hidden = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            left = K - k * BLOCK_K
            a = tl.load(x_at, mask=ks[None, :] < left, other=0.0)
            hidden = tl.dot(a, tl.load(hidden_at, mask=ks[:, None] < left, other=0.0), hidden)
            gate = tl.dot(a, tl.load(gate_at, mask=ks[:, None] < left, other=0.0), gate)
            x_at += BLOCK_K * stride_xk
            hidden_at += BLOCK_K * stride_wk
            gate_at += BLOCK_K * stride_wk
        if HAS_BIAS:
            hidden += tl.load(b + cols_in).to(tl.float32)[None, :]
            gate += tl.load(b + N + cols_in).to(tl.float32)[None, :]
        gated = hidden * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))
        at = out + rows[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(at, gated.to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))

    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for m, n, k, stages, warps in CONFIGS
    ]
    return triton.autotune(configs, key=["M", "N", "K"])(geglu_kernel), geglu_kernel


def fused_forward(self: GEGLU, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if type(self.proj) is not torch.nn.Linear:  # replaced after this part (float8's layers): diffusers' own
        return GEGLU.forward(self, hidden_states, *args, **kwargs)
    return torch.ops.runner.geglu(hidden_states, self.proj.weight, self.proj.bias)


@dataclass
class FusedGegluAccelerator(Accelerator):
    def check(self, device: torch.device) -> None:
        if device.type != "cuda":
            return  # diffusers' arithmetic: nothing to import
        try:
            import triton  # noqa: F401
        except ImportError as error:
            raise ConfigError(
                f"fused_geglu: Triton is not installed ({error}); it comes with torch's CUDA builds "
                "(pip install triton), or use an accelerator without FusedGegluAccelerator among its parts"
            ) from error

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        layers = [module for module in denoiser.modules() if isinstance(module, GEGLU)]
        if not layers:
            raise ConfigError(
                f"fused_geglu: {type(denoiser).__name__} has no GEGLU feed-forward to fuse; use an accelerator "
                "without FusedGegluAccelerator among its parts, e.g. accelerator=compile_graph"
            )
        for layer in layers:
            if type(layer.proj) is not torch.nn.Linear:  # e.g. float8's layer: it must come after this part
                raise ConfigError(
                    f"fused_geglu: a GEGLU's projection is a {type(layer.proj).__name__}, not a torch.nn.Linear; "
                    "put FusedGegluAccelerator before the part that replaced it (fp8), or leave it out"
                )
            layer.__class__ = named_like(type(layer), "fused_geglu", {"forward": fused_forward})
        self.fused = len(layers)

    def tags(self) -> dict[str, str]:
        return {"fused_geglu": str(self.fused)} if hasattr(self, "fused") else {}
