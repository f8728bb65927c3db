"""float8's fuse_geglu against the two float8 layers apart, at SDXL's feed-forward shapes, each compiled by inductor
and replayed from a CUDA graph as in a step:

    python3 benchmarks/float8_geglu_kernel.py OUT.json [fp16|bf16]

For each shape (rows = 2 x tokens with guidance, the block's width, its inner width) and each accumulation (fast,
as fp8_fast_bf16; promoted, as fp8_compile): microseconds per whole feed-forward (input quantised, GEGLU, output
layer) with the layers apart (cuBLAS's float8 product written in 16 bits, inductor's element-wise GELU, gating and
quantisation, cuBLAS's output product) and together (the float8 kernel, autotuned, then cuBLAS's output product);
the float8 kernel alone at each block size, nested and flat; and how far each feed-forward's output is from the
float32 one.
"""

import functools
import json
import sys
from collections.abc import Callable

import torch
from diffusers.models.attention import FeedForward
from geglu_kernel import SHAPES, graphed_us  # this folder, first on the path of a script run from it

from runner.accelerators.float8 import FLOAT8, CalibratedFloat8Linear, input_amax, quantise
from runner.accelerators.float8_geglu import Float8GegluFeedForward
from runner.accelerators.geglu_kernels import FLOAT8_CONFIGS, label, launch_float8, settings

# The nested tiles flattened, as the fp16 tma kernel's are, which ptxas serialises (geglu_kernels.LOOPS): timed to
# see what that costs.
FLAT = [(*config[:-1], "flat") for config in FLOAT8_CONFIGS if config[-1] == "nested"]


def feed_forwards(width: int, inner: int, x: torch.Tensor, fast: bool) -> tuple[FeedForward, FeedForward, Callable]:
    """SDXL's feed-forward of ``width`` (inner width ``inner``) in ``x``'s dtype, the same with both layers in
    calibrated float8 (calibrated on ``x``), and those layers fused."""
    exact = FeedForward(width, inner_dim=inner, activation_fn="geglu").to("cuda", x.dtype).eval()
    apart = FeedForward(width, inner_dim=inner, activation_fn="geglu").to("cuda", x.dtype).eval()
    apart.load_state_dict(exact.state_dict())
    layers = [apart.net[0].proj, apart.net[2]]
    amaxes = input_amax(layers, lambda: apart(x))
    apart.net[0].proj, apart.net[2] = (
        CalibratedFloat8Linear(layer, amax, fast) for layer, amax in zip(layers, amaxes, strict=True)
    )
    return exact, apart, Float8GegluFeedForward(apart.net[0].proj, apart.net[2])


def time_shape(name: str, rows: int, width: int, inner: int, dtype: torch.dtype, fast: bool) -> dict:
    """One shape's timings and errors, printed as they come."""
    torch.manual_seed(0)
    x = torch.randn(1, rows, width, device="cuda", dtype=dtype)
    exact, apart, together = feed_forwards(width, inner, x, fast)
    with torch.no_grad():
        reference = exact.float()(x.float())
    entry: dict = {"rows": rows, "width": width, "inner": inner, "fast_accumulation": fast}
    label_of = "fast" if fast else "promoted"

    def record(named: str, call: Callable, result: Callable | None = None) -> None:
        us = graphed_us(call)
        entry[named] = {"us": round(us, 2)}
        error = ""
        if result is not None:
            out = result().float()
            entry[named]["relative_error"] = relative = ((out - reference).norm() / reference.norm()).item()
            error = f"  relative error {relative:.4f}"
        print(f"{name:22s} {label_of:8s} {named:44s} {us:8.2f} us{error}", flush=True)

    with torch.no_grad():
        ways = {"apart (cuBLAS + inductor + cuBLAS)": apart, "together (float8 kernel + cuBLAS)": together}
        for way, module in ways.items():
            compiled = torch.compile(module, dynamic=False)
            record(way, functools.partial(compiled, x), functools.partial(compiled, x))
        proj = apart.net[0].proj
        x8 = quantise(x.reshape(rows, width), proj.input_inverse)
        out = torch.empty(rows, inner, device="cuda", dtype=FLOAT8)
        scale, inverse = together.product_scale, apart.net[2].input_inverse
        weights = (proj.weight_fp8, scale, inverse, proj.bias)
        for config in FLOAT8_CONFIGS + FLAT:
            named = f"kernel {label(*config)}"
            try:
                record(named, functools.partial(launch_float8, x8, *weights, out, fast, **settings(*config)))
            except Exception as error:  # a block size the GPU cannot fit: say so, time the others
                entry[named] = {"error": repr(error)[:300]}
                print(f"{name:22s} {label_of:8s} {named:44s} failed: {error!r:.200}", flush=True)
    return entry


def main(path: str, dtype_name: str = "bf16") -> None:
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": dtype_name, "shapes": {}}
    for fast in (True, False):
        for name, shape in SHAPES.items():
            results["shapes"][f"{name} {'fast' if fast else 'promoted'}"] = time_shape(name, *shape, dtype, fast)
            with open(path, "w") as file:  # after each shape: a call cut short keeps what it timed
                json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:])
