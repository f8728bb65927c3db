"""The matrix products of SDXL's transformer blocks at 1024 px, timed alone on the GPU: fp16 (with bias), and
torch._scaled_mm in float8 e4m3 with per-row scales (bf16 out, as Float8Linear) and with per-tensor scales
(fp16 out, bias in the epilogue, as CalibratedFloat8Linear), the latter also with cuBLAS's fast accumulation
(``use_fast_accum``, float8's option fast_accumulation). What float8 can give before any quantisation
cost: the kernels alone, on operands already in place. Prints one line per shape and writes them as JSON.

    python3 benchmarks/fp8_matmul.py OUT.json
"""

import json
import sys

import torch

FLOAT8 = torch.float8_e4m3fn
# (rows, in, out): CFG's batch of 2 x the tokens of SDXL's two attention levels at 1024 px (64x64 and 32x32
# latents), each block's projections: attention's (q, k, v, out alike), the feed-forward's GEGLU input and output,
# and the self-attention's Q, K and V as the one product fuse_qkv makes of them (compile_graph_fast, fp8_compile),
# whose float8 kernel was never timed: whether it, unlike the square ones, gains.
SHAPES = [
    (8192, 640, 640),
    (8192, 640, 5120),
    (8192, 2560, 640),
    (2048, 1280, 1280),
    (2048, 1280, 10240),
    (2048, 5120, 1280),
    (8192, 640, 1920),
    (2048, 1280, 3840),
]


def milliseconds(function, calls: int = 50) -> float:
    """Mean milliseconds of ``function`` over ``calls`` launched back to back, after 5 untimed."""
    for _ in range(5):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def time_shape(rows: int, inner: int, out: int) -> dict[str, float]:
    """Milliseconds per product of (rows x inner) by (inner x out), in fp16 and both float8 scalings, the
    per-tensor one with and without fast accumulation."""
    x = torch.randn(rows, inner, device="cuda", dtype=torch.float16)
    weight = torch.randn(out, inner, device="cuda", dtype=torch.float16) / inner**0.5
    bias = torch.randn(out, device="cuda", dtype=torch.float16)
    x8, w8 = x.to(FLOAT8), weight.to(FLOAT8)
    row_a, row_b, one = (
        torch.ones(rows, 1, device="cuda"),
        torch.ones(1, out, device="cuda"),
        torch.ones((), device="cuda"),
    )
    return {
        "fp16": milliseconds(lambda: torch.nn.functional.linear(x, weight, bias)),
        "fp8_rowwise": milliseconds(
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=row_a, scale_b=row_b, out_dtype=torch.bfloat16)
        ),
        "fp8_tensorwise": milliseconds(
            lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.float16)
        ),
        "fp8_tensorwise_fast": milliseconds(
            lambda: torch._scaled_mm(
                x8, w8.t(), scale_a=one, scale_b=one, bias=bias, out_dtype=torch.float16, use_fast_accum=True
            )
        ),
    }


def main(path: str) -> None:
    torch.manual_seed(0)
    results = []
    for rows, inner, out in SHAPES:
        times = time_shape(rows, inner, out)
        flop = 2 * rows * inner * out
        results.append(
            {"shape": [rows, inner, out], "ms": times, "tflops": {k: flop / v / 1e9 for k, v in times.items()}}
        )
        print(
            f"{rows}x{inner}x{out}: "
            + ", ".join(f"{name} {ms * 1000:.1f} us ({flop / ms / 1e9:.0f} TFLOP/s)" for name, ms in times.items())
        )
    device = {"name": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    with open(path, "w") as file:
        json.dump({"device": device, "shapes": results}, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
