"""float8's ``fuse_geglu`` (calibrated only): each feed-forward of the denoiser whose GEGLU product and output layer
are both float8 runs its GEGLU in one kernel (``Float8GegluFeedForward``; Triton, Hopper GPUs): the product, its
scale and bias, the GELU, the gating and the quantisation with the output layer's calibrated scale, so that the
gated result is written once, in float8, where the two layers apart write the product in 16 bits and read it back in
an element-wise kernel (on an H100 at 1024 px, 55 ms of a 0.96 s call:
``benchmarks/results/2026-11-27-h100-faster-5/twelfth_start/profile_fp8_cal_ff_fast_1024.log``). The GELU then
takes the product unrounded. Whether it pays is the kernel's product against cuBLAS's: fp16's fused GEGLU took only
4 ms of kernels off a call where the pass it removed took 47 (BENCHMARKS.md, "`compile_graph_fast` at 1024 px
again", H200). On one H100 start, in ``fp8_fast_bf16_geglu`` (a variant), 0.8557 s against 0.8848 s without it at
1024 px, the same time at 512 px; its output is cuBLAS's float8 product's with the GELU in float32, value for value
(at most 14 of 21 million values one float8 step apart, none further: BENCHMARKS.md, "Float8's fused GEGLU on its
first GPU"). With fast accumulation, in ``fp8_compile`` (``fuse_geglu: auto``, Hopper GPUs): 5.2-5.9% less at
1024 px and 2.3-2.7% at 512 px in both orders on another H100 start (BENCHMARKS.md, "Float8's fast accumulation
and fused GEGLU in fp8_compile").

On a GPU the operator ``float8_geglu`` runs ``geglu_kernels.float8_kernel``; elsewhere the same arithmetic in
float32 (``float8_geglu_reference``), which is what the CPU tests check the module swap against.
"""

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.activations import GEGLU
from diffusers.models.attention import FeedForward

from runner.accelerators.float8 import ALIGN, FLOAT8, CalibratedFloat8Linear, KeepsBufferDtypes, aligned_rows, quantise


def float8_geglu_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    inverse: torch.Tensor,
    bias: torch.Tensor | None,
    fast: bool | None = None,
) -> torch.Tensor:
    """The float8 GEGLU's arithmetic in float32: ``hidden * gelu(gate)`` of ``(x @ weight.T) * scale + bias``,
    halves as diffusers splits them, quantised with ``inverse``. ``fast`` None: the product summed in float32;
    True or False: as cuBLAS's float8 kernels sum it (``torch._scaled_mm``, a float32 output, ``fast`` its fast
    accumulation), which on Hopper's tensor cores differs from float32's sums where they cancel (with fast
    accumulation, 1.6% of 1024 px's values a float8 step or more apart, some dozens of steps near zero), as the
    fused kernel's do, value for value (BENCHMARKS.md, "Float8's fused GEGLU on its first GPU")."""
    if fast is None:
        product = (x.float() @ weight.float().t()) * scale
    else:
        one = torch.ones((), device=x.device)
        product = torch._scaled_mm(x, weight.t(), one, one, out_dtype=torch.float32, use_fast_accum=fast) * scale
    hidden, gate = (product if bias is None else product + bias.float()).chunk(2, dim=-1)
    return quantise(hidden * F.gelu(gate), inverse)


@torch.library.custom_op("runner::float8_geglu", mutates_args=())
def float8_geglu(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    inverse: torch.Tensor,
    bias: torch.Tensor | None,
    fast: bool,
) -> torch.Tensor:
    """``float8_geglu_reference``: one Triton kernel on a GPU (``geglu_kernels.float8_kernel``; ``fast``: its
    accumulation, as the layer's ``fast_accumulation``), float32 arithmetic elsewhere."""
    if x.device.type != "cuda":
        return float8_geglu_reference(x, weight, scale, inverse, bias)
    from runner.accelerators.geglu_kernels import launch_float8  # imports Triton: on a GPU only

    out = torch.empty(x.shape[0], weight.shape[0] // 2, device=x.device, dtype=FLOAT8)
    launch_float8(x, weight, scale, inverse, bias, out, fast)
    return out


@float8_geglu.register_fake
def _(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    inverse: torch.Tensor,
    bias: torch.Tensor | None,
    fast: bool,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0] // 2, dtype=FLOAT8)


class Float8GegluFeedForward(KeepsBufferDtypes):
    """Diffusers' ``FeedForward`` with a GEGLU whose product and the output layer's are both calibrated float8:
    the GEGLU's product, its scale and bias, the GELU, the gating and the quantisation of the output layer's
    input in one kernel (``float8_geglu``), which writes float8 for the output layer to read. Where the two
    layers run apart, the product is written in 16 bits and an element-wise kernel reads it back to write the
    float8 the output layer takes."""

    def __init__(self, proj: CalibratedFloat8Linear, out: CalibratedFloat8Linear) -> None:
        super().__init__()
        self.proj, self.out = proj, out
        self.register_buffer("product_scale", proj.input_scale * proj.weight_scale)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows, pad = aligned_rows(hidden_states, self.proj.in_features)
        quantised = quantise(rows, self.proj.input_inverse)  # inductor fuses it into the norm before
        gated = torch.ops.runner.float8_geglu(
            quantised,
            self.proj.weight_fp8,
            self.product_scale,
            self.out.input_inverse,
            self.proj.bias,
            self.proj.fast_accumulation,
        )
        out = self.out.product(gated, hidden_states.dtype)
        return out[: out.shape[0] - pad].reshape(*hidden_states.shape[:-1], self.out.out_features)


def fusable(feed_forward: torch.nn.Module) -> bool:
    """Whether a diffusers ``FeedForward`` is a GEGLU (exact GELU) and an output layer, both calibrated float8
    whose inner width float8's kernel can address, with only dropout (a no-op in inference) besides."""
    net = list(getattr(feed_forward, "net", ()))
    if not net or type(net[0]) is not GEGLU:  # diffusers' GEGLU: the exact GELU (ApproximateGELU is another class)
        return False
    projections = [net[0].proj, *(layer for layer in net[1:] if type(layer) is not torch.nn.Dropout)]
    return (
        len(projections) == 2
        and all(type(layer) is CalibratedFloat8Linear for layer in projections)
        and (projections[0].out_features // 2) % ALIGN == 0  # the float8 rows it writes, 16-byte aligned
    )


def fuse_geglus(denoiser: torch.nn.Module) -> tuple[int, int]:
    """Replace each diffusers ``FeedForward`` of ``denoiser`` that ``fusable`` takes by ``Float8GegluFeedForward``;
    return how many were and how many GEGLU feed-forwards were left as they are."""
    fused = left = 0
    for parent in list(denoiser.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not FeedForward or not isinstance(child.net[0], GEGLU):
                continue
            if fusable(child):
                net = [layer for layer in child.net if type(layer) is not torch.nn.Dropout]
                setattr(parent, name, Float8GegluFeedForward(child.net[0].proj, net[-1]))
                fused += 1
            else:
                left += 1
    return fused, left
