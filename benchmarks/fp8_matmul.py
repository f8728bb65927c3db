"""The matrix products of SDXL's transformer blocks at 1024 and 512 px, timed alone on the GPU as a step runs them:
replayed from one CUDA graph of 20 products, each with an input and a weight of its own (as a step's blocks have),
so the figure is the GPU's time per product, not Python's time to launch one. fp16 (with bias), and
torch._scaled_mm in float8 e4m3 with per-row scales (bf16 out, as Float8Linear) and with per-tensor scales (fp16
out, bias in the epilogue, as CalibratedFloat8Linear), the latter also with cuBLAS's fast accumulation
(``use_fast_accum``, float8's option fast_accumulation), and with its input quantised by a kernel of its own first
(inductor's, as a compiled UNet quantises an input it cannot fuse into the kernel that makes it: the attention's
output, which the output projection reads). Prints one line per shape and writes them as JSON.

    python3 benchmarks/fp8_matmul.py OUT.json

Before 2026-12-05 this script launched each product from Python 50 times back to back: at the small products'
sizes that timed the launches (a floor of about 22-26 µs for fp16 and 27-34 µs for float8 on the H100 and H200
hosts, where the float8 product of 6.7 GFLOP took longer than one of 21), not the kernels (BENCHMARKS.md,
"Float8's square products timed by their launches").
"""

import json
import sys

import torch
from replay import captured, device_record, replayed_us  # this folder, first on the path of a script run from it

FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max
CALLS = 20
# (px, rows, in, out, what): CFG's batch of 2 x the tokens of SDXL's two attention levels (64x64 and 32x32 latents
# at 1024 px, 32x32 and 16x16 at 512 px), each block's products: the attention projections (self-attention's output,
# cross-attention's query and output: square), the self-attention's Q, K and V as the one product fuse_qkv makes of
# them, the feed-forward's GEGLU input and its output.
SHAPES = [
    (px, rows, inner, out, what)
    for px, (wide, narrow) in ((1024, (8192, 2048)), (512, (2048, 512)))
    for rows, inner, out, what in (
        (wide, 640, 640, "attention projection"),
        (wide, 640, 1920, "fused Q, K, V"),
        (wide, 640, 5120, "feed-forward in"),
        (wide, 2560, 640, "feed-forward out"),
        (narrow, 1280, 1280, "attention projection"),
        (narrow, 1280, 3840, "fused Q, K, V"),
        (narrow, 1280, 10240, "feed-forward in"),
        (narrow, 5120, 1280, "feed-forward out"),
    )
]


torch._dynamo.config.recompile_limit = len(SHAPES)  # quantise below: one kernel per input shape


@torch.compile(dynamic=False)
def quantise(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """As runner.accelerators.float8.quantise, in one inductor kernel."""
    return (x.float() * inverse).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)


def time_shape(rows: int, inner: int, out: int) -> dict[str, float]:
    """µs per product of (rows x inner) by (inner x out) in fp16 and each float8 way, each way replayed from one CUDA
    graph of CALLS products with operands of their own."""
    xs = [torch.randn(rows, inner, device="cuda", dtype=torch.float16) for _ in range(CALLS)]
    weights = [torch.randn(out, inner, device="cuda", dtype=torch.float16) / inner**0.5 for _ in range(CALLS)]
    biases = [torch.randn(out, device="cuda", dtype=torch.float16) for _ in range(CALLS)]
    x8s, w8s = [x.to(FLOAT8) for x in xs], [w.to(FLOAT8) for w in weights]
    row_a, row_b = torch.ones(rows, 1, device="cuda"), torch.ones(1, out, device="cuda")
    one = torch.ones((), device="cuda")
    operands = list(zip(xs, weights, biases, x8s, w8s, strict=True))

    def tensorwise(x8: torch.Tensor, w8: torch.Tensor, bias: torch.Tensor, fast: bool) -> torch.Tensor:
        return torch._scaled_mm(
            x8, w8.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.float16, use_fast_accum=fast
        )

    ways = {
        "fp16": lambda: [torch.nn.functional.linear(x, w, b) for x, w, b, _, _ in operands],
        "fp8_rowwise": lambda: [
            torch._scaled_mm(x8, w8.t(), scale_a=row_a, scale_b=row_b, out_dtype=torch.bfloat16)
            for _, _, _, x8, w8 in operands
        ],
        "fp8_tensorwise": lambda: [tensorwise(x8, w8, b, False) for _, _, b, x8, w8 in operands],
        "fp8_tensorwise_fast": lambda: [tensorwise(x8, w8, b, True) for _, _, b, x8, w8 in operands],
        "fp8_quantised_fast": lambda: [tensorwise(quantise(x, one), w8, b, True) for x, _, b, _, w8 in operands],
    }
    return {name: replayed_us(captured(way), CALLS) for name, way in ways.items()}


def main(path: str) -> None:
    torch.manual_seed(0)
    results = []
    with torch.no_grad():
        for px, rows, inner, out, what in SHAPES:
            times = time_shape(rows, inner, out)
            flop = 2 * rows * inner * out
            results.append(
                {
                    "px": px,
                    "what": what,
                    "shape": [rows, inner, out],
                    "us": times,
                    "tflops": {name: flop / us / 1e6 for name, us in times.items()},
                }
            )
            print(
                f"{px} px {what}, {rows}x{inner}x{out}: "
                + ", ".join(f"{name} {us:.1f} us ({flop / us / 1e6:.0f} TFLOP/s)" for name, us in times.items()),
                flush=True,
            )
    timing = f"replayed from one CUDA graph of {CALLS} products with operands of their own"
    device = device_record() | {"timing": timing}
    with open(path, "w") as file:
        json.dump({"device": device, "shapes": results}, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
