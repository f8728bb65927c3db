"""fused_geglu's kernel against what compile_graph_fast runs (cuBLAS's product with its bias, then inductor's
element-wise GELU and gating), at SDXL's feed-forward shapes, each replayed from a CUDA graph as in a step:

    python3 benchmarks/geglu_kernel.py OUT.json

For each shape (rows = 2 x tokens with guidance, the block's width, its inner width): microseconds per call of the
compiled reference, of cuBLAS's product alone, and of each kernel (pointers, tma) with each of its block sizes and
with the autotuner's choice (tma's flat tiles with nested loops too); their TFLOP/s, and the largest difference from
a float32 computation (next to the reference's own).
"""

import functools
import json
import sys
from collections.abc import Callable

import torch
from memsets import REPEATS, graphed  # this folder, first on the path of a script run from it
from replay import replayed_us

from runner.accelerators.fused_geglu import geglu, geglu_reference
from runner.accelerators.geglu_kernels import BLOCKS, CONFIGS, label, launch, settings

SHAPES = {  # (rows, width, inner) of SDXL's GEGLU products, batch 1 with guidance
    "512px 32x32 blocks": (2048, 640, 2560),
    "512px 16x16 blocks": (512, 1280, 5120),
    "1024px 64x64 blocks": (8192, 640, 2560),
    "1024px 32x32 blocks": (2048, 1280, 5120),
}
REPLAYS = 20
# The tma kernel's tiles in the loops its autotuner's table leaves out (geglu_kernels.LOOPS; its table is the two
# widest nested): timed beside it, so that the table's choice is checked again on each GPU.
OTHERS = [(*block, loop) for block in BLOCKS for loop in ("nested", "flat") if (*block, loop) not in CONFIGS["tma"]]


def graphed_us(call: Callable) -> float:
    """Microseconds per call of ``call``, captured ``REPEATS`` times in one CUDA graph and replayed."""
    return replayed_us(graphed(call), REPEATS, REPLAYS)


def time_shape(name: str, rows: int, width: int, inner: int, compiled: Callable) -> dict:
    """One shape's timings and errors, printed as they come."""
    x = torch.randn(rows, width, device="cuda", dtype=torch.float16)
    weight = (torch.randn(2 * inner, width, device="cuda") / width**0.5).half()
    bias = torch.randn(2 * inner, device="cuda", dtype=torch.float16) * 0.1
    exact = geglu_reference(x.float(), weight.float(), bias.float())
    out = torch.empty(rows, inner, device="cuda", dtype=torch.float16)
    tflop = 2 * rows * width * 2 * inner / 1e12
    entry: dict = {"rows": rows, "width": width, "inner": inner}

    def record(label: str, call: Callable, result: Callable) -> None:
        us = graphed_us(call)
        error = (result().float() - exact).abs().max().item()
        entry[label] = {"us": round(us, 2), "tflops": round(tflop / us * 1e6, 1), "max_abs_error": error}
        print(f"{name:22s} {label:40s} {us:8.2f} us {tflop / us * 1e6:6.1f} TFLOP/s  max error {error:.4f}")

    def reference() -> torch.Tensor:
        return compiled(x, weight, bias)

    def product() -> torch.Tensor:  # cuBLAS's product alone: how much of the reference the element-wise pass is
        return torch.nn.functional.linear(x, weight, bias)

    record("compiled reference (cuBLAS + inductor)", reference, reference)
    us = graphed_us(product)
    entry["cuBLAS product alone"] = {"us": round(us, 2), "tflops": round(tflop / us * 1e6, 1)}
    print(f"{name:22s} {'cuBLAS product alone':40s} {us:8.2f} us {tflop / us * 1e6:6.1f} TFLOP/s")
    for kernel, configs in CONFIGS.items():
        for config in configs + (OTHERS if kernel == "tma" else []):
            named = f"{kernel} {label(*config)}"
            try:
                record(named, functools.partial(launch, x, weight, bias, out, kernel, **settings(*config)), lambda: out)
            except Exception as error:  # a block size the GPU cannot fit: say so, time the others
                entry[named] = {"error": repr(error)[:300]}
                print(f"{name:22s} {named:40s} failed: {error!r:.200}")
        autotuned = functools.partial(geglu, x, weight, bias, kernel)
        try:
            record(f"{kernel} autotuned (the op)", autotuned, autotuned)
        except Exception as error:
            entry[f"{kernel} autotuned (the op)"] = {"error": repr(error)[:300]}
            print(f"{name:22s} {kernel} autotuned failed: {error!r:.200}")
    return entry


def main(path: str) -> None:
    torch.manual_seed(0)
    compiled = torch.compile(geglu_reference, dynamic=False)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": {}}
    for name, shape in SHAPES.items():
        results["shapes"][name] = time_shape(name, *shape, compiled)
        with open(path, "w") as file:  # after each shape: a call cut short keeps what it timed
            json.dump(results, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
