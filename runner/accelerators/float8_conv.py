"""Float8 convolutions: the denoiser's convolutions in float8 e4m3 on cuDNN (Hopper and Ada tensor cores).

torch 2.11 has float8 matrix products (``torch._scaled_mm``) but no float8 convolution, and the convolutions are
what ``fp8_compile`` still runs in 16-bit: about 200 ms of a 1024 px SDXL call on an H200 (BENCHMARKS.md, "Float8
on the fused Q, K, V product"). cuDNN has float8 convolution kernels; its graph API, reached from Python through
NVIDIA's ``cudnn`` package (``pip install nvidia-cudnn-frontend``), builds one for a shape with its epilogue
fused: the product's float32 accumulator times one scale per output channel (the input's calibrated scale times
that channel's weight scale), plus the bias, written in the pipeline's dtype.

``CalibratedFloat8Conv2d`` replaces a ``Conv2d`` as ``CalibratedFloat8Linear`` replaces a linear layer: the weight
quantised once with one scale per output channel, the input with one scale fixed by a calibration call (a
multiply and a cast that inductor fuses into the kernel that makes the input, written channels_last as cuDNN
wants it), then ``torch.ops.runner.float8_conv2d``: an operator torch.compile traces as one opaque call and a
CUDA graph captures. On a CUDA device it runs cuDNN's kernel; elsewhere (the CPU machine's tests) it computes
the same numbers the slow way, the float8 operands widened to float32 for ``conv2d``: the reference the GPU test
compares cuDNN's result with.

Not yet timed on a GPU: ``benchmarks/fp8_conv.py`` times cuDNN's float8 kernels against fp16's at SDXL's
convolution shapes, and the benchmark variant ``fp8_conv_compile`` (benchmarks/conf) a whole call. It is in no
accelerator until those say it pays.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from runner.accelerators.float8 import ALIGN, FLOAT8, FLOAT8_MAX, quantise, scale_of
from runner.config import ConfigError
from runner.errors import RunnerError, one_line

INSTALL = "pip install nvidia-cudnn-frontend (NVIDIA's Python API to cuDNN's graphs; the cuDNN torch ships is used)"


def convertible(conv: torch.nn.Module) -> bool:
    """A plain 2-D convolution cuDNN's float8 kernels take: one group, no dilation, zero padding given as
    numbers, channels in multiples of 16 as for float8's matrix products (SDXL's UNet: all but its first and last,
    with 4 channels)."""
    return (
        type(conv) is torch.nn.Conv2d
        and conv.groups == 1
        and conv.dilation == (1, 1)
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and conv.in_channels % ALIGN == 0
        and conv.out_channels % ALIGN == 0
    )


@torch.library.custom_op("runner::float8_conv2d", mutates_args=())
def float8_conv2d(
    image: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``conv2d(image, weight) * scale + bias`` in ``out_dtype``, channels_last: ``image`` and ``weight`` in float8
    e4m3 (channels_last), ``scale`` float32 of shape (1, out channels, 1, 1), ``bias`` (out channels,) or None.
    This body serves devices without cuDNN's kernel (the CPU): float8 operands widened, products in float32."""
    out = F.conv2d(image.float(), weight.float(), stride=stride, padding=padding) * scale
    if bias is not None:
        out = out + bias.float().view(1, -1, 1, 1)
    return out.to(out_dtype).contiguous(memory_format=torch.channels_last)


@float8_conv2d.register_fake
def _(image, weight, scale, bias, stride, padding, out_dtype):
    shape = output_shape(image, weight, stride, padding)
    return torch.empty(shape, dtype=out_dtype, device=image.device, memory_format=torch.channels_last)


@float8_conv2d.register_kernel("cuda")
def _(image, weight, scale, bias, stride, padding, out_dtype):
    return cudnn_conv(image, weight, scale, bias, stride, padding, out_dtype)


def output_shape(image: torch.Tensor, weight: torch.Tensor, stride: list[int], padding: list[int]) -> list[int]:
    batch, _, height, width = image.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    return [
        batch,
        out_channels,
        (height + 2 * padding[0] - kernel_h) // stride[0] + 1,
        (width + 2 * padding[1] - kernel_w) // stride[1] + 1,
    ]


class CalibratedFloat8Conv2d(torch.nn.Module):
    """A convolution whose product runs in float8: one scale per output channel for its weight, one for its input
    calibrated beforehand (see the module's docstring)."""

    def __init__(self, conv: torch.nn.Conv2d, input_amax: torch.Tensor) -> None:
        super().__init__()
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride, self.padding = conv.kernel_size, list(conv.stride), list(conv.padding)
        weight = conv.weight.detach()
        weight_scale = scale_of(weight.abs().amax(dim=(1, 2, 3)))  # (out,)
        quantised = (weight.float() / weight_scale.view(-1, 1, 1, 1)).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)
        self.register_buffer("weight_fp8", quantised.contiguous(memory_format=torch.channels_last))
        input_scale = scale_of(input_amax)
        self.register_buffer("input_inverse", 1 / input_scale)
        self.register_buffer("scale", (input_scale * weight_scale).view(1, -1, 1, 1).contiguous())
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantised = quantise(x, self.input_inverse).contiguous(memory_format=torch.channels_last)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return float8_conv2d(quantised, self.weight_fp8, self.scale, bias, self.stride, self.padding, x.dtype)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={tuple(self.stride)}, "
            f"padding={tuple(self.padding)}, float8 e4m3, calibrated scales"
        )


def check_cudnn() -> None:
    """Raise ConfigError with the fix if NVIDIA's Python API to cuDNN is missing or finds no cuDNN library."""
    try:
        import cudnn
    except ImportError as missing:
        raise ConfigError(f"accelerator.convolutions=true needs cuDNN's graph API from Python: {INSTALL}") from missing
    try:
        cudnn.backend_version()
    except RuntimeError as unloaded:  # "Unable to find symbol cudnnGetVersion": no libcudnn it could open
        raise ConfigError(
            f"accelerator.convolutions=true: cuDNN's Python API found no cuDNN library ({unloaded}); it loads the one "
            "torch ships (nvidia-cudnn-cu*): reinstall torch with CUDA, or put libcudnn.so.9 on LD_LIBRARY_PATH"
        ) from unloaded


# cuDNN's side: one graph per shape, built on its first call (the warmup), executed on torch's current stream.

EPILOGUES = ("scale_bias", "scale", "none")  # what the graph does after the product (benchmarks/fp8_conv.py: each)


@dataclass
class Plan:
    graph: Any  # cudnn.pygraph, built
    tensors: dict[str, Any]  # its tensors by role: image, weight, scale, bias, out
    workspace_bytes: int


_handles: dict[int, Any] = {}
_plans: dict[tuple, Plan] = {}


def handle(device: torch.device) -> Any:
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = cudnn.create_handle()
    return _handles[index]


def cudnn_type(dtype: torch.dtype) -> Any:
    import cudnn

    types = {
        torch.float16: cudnn.data_type.HALF,
        torch.bfloat16: cudnn.data_type.BFLOAT16,
        torch.float32: cudnn.data_type.FLOAT,
        FLOAT8: cudnn.data_type.FP8_E4M3,
    }
    if dtype not in types:
        raise ConfigError(f"float8 convolutions write float16, bfloat16 or float32, not {dtype}: use dtype=fp16")
    return types[dtype]


def build_plan(
    image: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    out_dtype: torch.dtype,
    epilogue: str = "scale_bias",
) -> Plan:
    """cuDNN's graph for one float8 convolution shape: the product accumulated in float32, then ``epilogue``."""
    import cudnn

    io = cudnn_type(out_dtype)
    graph = cudnn.pygraph(
        io_data_type=io,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle(image.device),
    )
    out_channels = weight.shape[0]
    per_channel = {"dim": [1, out_channels, 1, 1], "stride": [out_channels, 1, out_channels, out_channels]}
    tensors = {
        "image": graph.tensor(
            name="image", dim=list(image.shape), stride=list(image.stride()), data_type=cudnn.data_type.FP8_E4M3
        ),
        "weight": graph.tensor(
            name="weight", dim=list(weight.shape), stride=list(weight.stride()), data_type=cudnn.data_type.FP8_E4M3
        ),
    }
    out = graph.conv_fprop(
        image=tensors["image"],
        weight=tensors["weight"],
        padding=list(padding),
        stride=list(stride),
        dilation=[1, 1],
        compute_data_type=cudnn.data_type.FLOAT,
        name="conv",
    )
    if epilogue in ("scale", "scale_bias"):
        tensors["scale"] = graph.tensor(name="scale", data_type=cudnn.data_type.FLOAT, **per_channel)
        out = graph.mul(a=out, b=tensors["scale"], compute_data_type=cudnn.data_type.FLOAT, name="descale")
    if epilogue == "scale_bias":
        tensors["bias"] = graph.tensor(name="bias", data_type=io, **per_channel)
        out = graph.bias(input=out, bias=tensors["bias"], compute_data_type=cudnn.data_type.FLOAT, name="bias")
    out.set_output(True).set_data_type(io)
    tensors["out"] = out
    graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    return Plan(graph, tensors, graph.get_workspace_size())


def plan_for(
    image: torch.Tensor,
    weight: torch.Tensor,
    stride: list[int],
    padding: list[int],
    out_dtype: torch.dtype,
    epilogue: str,
) -> Plan:
    key = (
        tuple(image.shape), tuple(image.stride()), tuple(weight.shape), tuple(weight.stride()), tuple(stride),
        tuple(padding), out_dtype, epilogue, image.device,
    )  # fmt: skip
    if key not in _plans:
        try:
            _plans[key] = build_plan(image, weight, stride, padding, out_dtype, epilogue)
        except Exception as refused:  # cuDNN's graph API raises types of its own (cudnnGraphNotSupportedError, ...)
            raise RunnerError(
                f"accelerator.convolutions=true: cuDNN built no float8 kernel for a convolution of "
                f"{list(image.shape)} by {list(weight.shape)} (stride {list(stride)}, padding {list(padding)}) "
                f"writing {out_dtype}; drop accelerator.convolutions, or time the shapes with "
                f"benchmarks/fp8_conv.py (cuDNN said {one_line(refused)})"
            ) from refused
    return _plans[key]


def cudnn_conv(
    image: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The operator on a CUDA device: cuDNN's float8 kernel for this shape, on torch's current stream (so a CUDA
    graph being captured records it), its workspace from torch's allocator."""
    import cudnn

    image = image.contiguous(memory_format=torch.channels_last)
    weight = weight.contiguous(memory_format=torch.channels_last)
    epilogue = "none" if scale is None else ("scale" if bias is None else "scale_bias")
    plan = plan_for(image, weight, stride, padding, out_dtype, epilogue)
    out = torch.empty(
        output_shape(image, weight, stride, padding), dtype=out_dtype, device=image.device,
        memory_format=torch.channels_last,
    )  # fmt: skip
    workspace = torch.empty(plan.workspace_bytes, dtype=torch.uint8, device=image.device)
    feeds = {plan.tensors["image"]: image, plan.tensors["weight"]: weight, plan.tensors["out"]: out}
    if scale is not None:
        feeds[plan.tensors["scale"]] = scale
    if bias is not None:
        feeds[plan.tensors["bias"]] = bias
    cuda_handle = handle(image.device)
    cudnn.set_stream(handle=cuda_handle, stream=torch.cuda.current_stream(image.device).cuda_stream)
    plan.graph.execute(feeds, workspace, handle=cuda_handle)
    return out
