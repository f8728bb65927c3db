"""SDXL's UNet convolutions timed alone on the GPU: torch's fp16 and bf16 (cuDNN, channels_last, bias), against
cuDNN's float8 e4m3 kernels built through its graph API (runner/accelerators/float8_conv.py) with each epilogue
and output dtype. What float8 convolutions can give before any quantisation cost: the kernels alone, on operands
already in place. Whether cuDNN builds a float8 graph at all for a shape is part of the answer: a variant it
refuses is recorded with cuDNN's message, not dropped.

The shapes are the UNet's own at each size, found by running the shipped SDXL architecture on the meta device
(no weights, no GPU work) with a hook on every convolution; each shape's count says how often a step runs it, so
the table ends with what one call's 30 steps would spend on convolutions in each variant.

    python3 benchmarks/fp8_conv.py OUT.json [RES ...]      # default sizes: 1024 512
"""

import collections
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_timing import attempt, device_info, milliseconds, shape_line

from runner.accelerators.float8_conv import EPILOGUES, FLOAT8, convertible, cudnn_conv

STEPS = 30
UNET = Path(__file__).resolve().parent.parent / "runner" / "architectures" / "sdxl" / "unet"
Shape = tuple[tuple[int, ...], int, int, int, int]  # (input shape), out channels, kernel, stride, padding


def conv_shapes(res: int) -> collections.Counter:
    """Each convertible convolution shape of SDXL's UNet at ``res`` px (CFG's batch of 2) and how many a step runs."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(UNET))
    seen: collections.Counter = collections.Counter()

    def hook(conv: torch.nn.Conv2d, args: tuple) -> None:
        if convertible(conv):
            seen[(tuple(args[0].shape), conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0])] += 1

    for conv in unet.modules():
        if isinstance(conv, torch.nn.Conv2d):
            conv.register_forward_pre_hook(hook)
    side = res // 8
    with torch.device("meta"), torch.no_grad():
        unet(
            torch.randn(2, 4, side, side), torch.ones(2), torch.randn(2, 77, 2048),
            added_cond_kwargs={"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)},
        )  # fmt: skip
    return seen


def time_shape(shape: Shape) -> dict[str, dict]:
    """Each variant's milliseconds (or cuDNN's refusal) and its error against float32 arithmetic on the same
    rounded operands."""
    size, out_channels, kernel, stride, padding = shape
    x = torch.randn(size, device="cuda").to(memory_format=torch.channels_last)
    fan_in = size[1] * kernel * kernel
    weight = torch.randn(out_channels, size[1], kernel, kernel, device="cuda") / fan_in**0.5
    weight = weight.to(memory_format=torch.channels_last)
    bias = torch.randn(out_channels, device="cuda")
    # Operands as float8 holds them with no scale (inputs ~N(0, 1), weights 16x theirs, ~0.3): no variant's
    # output overflows 16 bits, the one without an epilogue included; the epilogue's scale takes the 16 back.
    x8 = x.to(FLOAT8).contiguous(memory_format=torch.channels_last)
    w8 = (weight * 16).to(FLOAT8).contiguous(memory_format=torch.channels_last)
    scale = torch.full((1, out_channels, 1, 1), 1 / 16, device="cuda")
    exact = F.conv2d(x8.float(), w8.float(), stride=stride, padding=padding)
    results: dict[str, dict] = {}
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        xs, ws, bs = x.to(dtype), weight.to(dtype), bias.to(dtype)
        results[f"torch_{name}"] = {
            "ms": milliseconds(lambda xs=xs, ws=ws, bs=bs: F.conv2d(xs, ws, bs, stride=stride, padding=padding))
        }
        for epilogue in EPILOGUES:
            variant = f"fp8_{epilogue}_{name}"
            scales = None if epilogue == "none" else scale
            biases = bs if epilogue == "scale_bias" else None
            expected = exact if scales is None else exact * scale
            expected = expected if biases is None else expected + bias.view(1, -1, 1, 1)

            def build(dtype=dtype, scales=scales, biases=biases) -> Callable[[], torch.Tensor]:
                return lambda: cudnn_conv(x8, w8, scales, biases, [stride] * 2, [padding] * 2, dtype)

            results[variant] = attempt(build, expected)
    return results


def main(path: str, sizes: list[int]) -> None:
    torch.manual_seed(0)
    report: dict = {"device": device_info(), "sizes": {}}
    for res in sizes:
        rows, totals = [], collections.Counter()
        for shape, count in sorted(conv_shapes(res).items(), key=lambda item: -item[0][0][2]):
            times = time_shape(shape)
            size, out_channels, kernel, stride, _ = shape
            flop = 2 * size[0] * out_channels * size[1] * kernel * kernel * (size[2] // stride) * (size[3] // stride)
            rows.append({"shape": shape, "count": count, "flop": flop, "variants": times})
            for variant, result in times.items():
                totals[variant] += STEPS * count * result.get("ms", float("nan"))
            print(shape_line(f"{res} px {size} -> {out_channels} k{kernel} s{stride} x{count}", times), flush=True)
        report["sizes"][res] = {"shapes": rows, "call_ms": dict(totals)}
        print(f"{res} px, {STEPS} steps' convolutions (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], [int(res) for res in sys.argv[2:]] or [1024, 512])
