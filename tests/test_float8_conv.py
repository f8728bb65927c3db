"""Float8 convolutions (float8's ``convolutions`` option): each a float8 product within float8's rounding of the
convolution, calibrated in the same call as the linear layers, traceable and savable by torch.compile, refused in
one line where it cannot run; cuDNN's kernel on a GPU gives the CPU's numbers."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import load_model

from runner.accelerators import Target
from runner.accelerators.cuda_graph import GraphedModule
from runner.accelerators.float8 import Float8Accelerator, to_calibrated_float8
from runner.accelerators.float8_conv import CalibratedFloat8Conv2d, convertible, float8_conv2d
from runner.accelerators.torch_compile import TorchCompileAccelerator
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
NO_LIBRARY = "Unable to find symbol cudnnGetVersion"  # what cudnn.backend_version() raised on this CPU machine
CALL = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


@pytest.mark.parametrize(
    ("kernel", "stride", "dtype"), [(3, 1, torch.float32), (3, 2, torch.bfloat16), (1, 1, torch.float32)]
)
def test_a_float8_convolution_is_the_convolution_within_float8_rounding_and_saturates_beyond(kernel, stride, dtype):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, kernel, stride=stride, padding=kernel // 2).to(dtype)
    x = torch.randn(2, 32, 9, 9, dtype=dtype)
    layer = CalibratedFloat8Conv2d(conv, x.abs().amax())
    with torch.no_grad():
        expected, got = conv(x), layer(x)
        assert got.dtype == dtype and got.shape == expected.shape
        assert got.is_contiguous(memory_format=torch.channels_last)  # as cuDNN writes it
        assert 0 < relative_error(got, expected) < 0.06  # changed, by about float8's rounding of both operands
        louder = layer(x * 4)  # beyond the calibrated range: saturated at e4m3's largest value, not overflowed
        assert torch.isfinite(louder).all() and relative_error(louder, conv(x * 4)) > 0.2
    assert layer.scale.shape == (1, 48, 1, 1) and layer.scale.dtype == torch.float32  # a scale per output channel
    pad = kernel // 2
    assert repr(layer).endswith(f"stride=({stride}, {stride}), padding=({pad}, {pad}), float8 e4m3, calibrated scales)")


def test_what_cudnns_float8_kernels_take_is_converted_and_nothing_else() -> None:
    assert convertible(torch.nn.Conv2d(320, 640, 3, padding=1))
    assert not convertible(torch.nn.Conv2d(4, 320, 3, padding=1))  # SDXL's first: 4 latent channels
    assert not convertible(torch.nn.Conv2d(320, 4, 3, padding=1))  # and its last
    assert not convertible(torch.nn.Conv2d(32, 32, 3, groups=2))
    assert not convertible(torch.nn.Conv2d(32, 32, 3, dilation=2))
    assert not convertible(torch.nn.Conv2d(32, 32, 3, padding="same"))
    assert not convertible(torch.nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect"))


def test_the_operator_traces_and_compiles() -> None:
    """Its fake kernel gives torch.compile the output's shape and channels_last strides, so a whole graph holds
    it and inductor fuses the quantisation into the kernel that makes the input."""
    torch.manual_seed(0)
    image = torch.randn(2, 16, 8, 8).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(32, 16, 3, 3).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    scale, bias = torch.full((1, 32, 1, 1), 0.01), torch.randn(32)
    checks = ("test_faketensor", "test_aot_dispatch_dynamic")  # test_schema's arithmetic has no float8 CPU kernel
    for args in ((scale, bias, [1, 1], [1, 1], torch.float32), (scale, None, [2, 2], [0, 0], torch.bfloat16)):
        torch.library.opcheck(float8_conv2d, (image, weight, *args), test_utils=checks)
    conv = torch.nn.Conv2d(16, 32, 3, padding=1)
    x = torch.randn(2, 16, 8, 8)
    layer = CalibratedFloat8Conv2d(conv, x.abs().amax())
    with torch.no_grad():  # as pipelines run: the operator has no backward
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def calibrating(pipe, tmp_path: Path, calls: list) -> Target:
    def calibrate(prompts: list[str]) -> None:
        calls.append(prompts)
        pipe(prompt="a", **CALL)

    return Target("unet", CPU, torch.float32, tmp_path, "tiny_sdxl-random-t2i-64x64-fp32", calibration=calibrate)


def test_convolutions_are_calibrated_in_the_linear_layers_call_and_the_4_channel_ones_stay(tmp_path: Path) -> None:
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    generator = torch.Generator().manual_seed(0)
    expected = pipe(prompt="a cat", generator=generator, **CALL).images[0]
    convs = [module for module in pipe.unet.modules() if isinstance(module, torch.nn.Conv2d)]
    calls: list = []
    accelerator = Float8Accelerator(scaling="calibrated", include=["ff."], convolutions=True)
    accelerator.check(CPU)
    accelerator.apply(pipe, calibrating(pipe, tmp_path, calls))
    assert calls == [[]]  # one calibration call for both kinds of layer
    converted = [module for module in pipe.unet.modules() if isinstance(module, CalibratedFloat8Conv2d)]
    assert len(converted) == sum(convertible(conv) for conv in convs) == len(convs) - 2
    assert type(pipe.unet.conv_in) is torch.nn.Conv2d and type(pipe.unet.conv_out) is torch.nn.Conv2d
    assert accelerator.metrics() == {"float8_linears": 8.0, "float8_convolutions": float(len(converted))}
    got = pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **CALL).images[0]
    assert np.isfinite(got).all() and 0 < np.abs(got - expected).mean() < 0.05  # float8's change, small


def test_without_the_option_no_convolution_changes_and_no_metric_is_logged(tmp_path: Path) -> None:
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = Float8Accelerator(scaling="calibrated")
    accelerator.apply(pipe, calibrating(pipe, tmp_path, []))
    assert not any(isinstance(module, CalibratedFloat8Conv2d) for module in pipe.unet.modules())
    assert "float8_convolutions" not in accelerator.metrics()
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 1), torch.nn.Conv2d(16, 16, 1))
    model._repeated_blocks = ("Conv2d",)  # no linear layer in its blocks; the second convolution never reached
    assert to_calibrated_float8(model, lambda: model[0](torch.randn(1, 16, 2, 2)), convolutions=True) == (0, 0, 1)


def test_float8_convolutions_compile_and_are_saved_and_loaded_whole(tmp_path: Path) -> None:
    """The operator in a precompiled UNet: written by the first process, loaded by the next, the same images."""
    images = []
    for _ in range(2):
        torch._dynamo.reset()
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
        target = calibrating(pipe, tmp_path, [])
        Float8Accelerator(scaling="calibrated", include=["ff."], convolutions=True).apply(pipe, target)
        compile_ = TorchCompileAccelerator(backend="aot_eager", compile_vae=False, cache=False, precompile=True)
        compile_.apply(pipe, target)
        images.append(pipe(prompt="a cat", generator=torch.Generator().manual_seed(0), **CALL).images[0])
        notes = compile_.warmup_note()
    assert notes.startswith("saved compiled modules loaded")
    np.testing.assert_array_equal(images[0], images[1])


def no_library() -> None:
    raise RuntimeError(NO_LIBRARY)


@pytest.mark.parametrize(
    ("options", "device", "refusal"),
    [
        (
            {"convolutions": True},
            CPU,
            "accelerator.convolutions=true takes calibrated input scales, and this is scaling=rowwise: add "
            "accelerator.scaling=calibrated, or drop it",
        ),
        (
            {"convolutions": True, "scaling": "calibrated"},
            torch.device("cuda"),
            "accelerator.convolutions=true needs cuDNN's graph API from Python: pip install nvidia-cudnn-frontend",
        ),
        (
            {"convolutions": True, "scaling": "calibrated", "unloaded": True},
            torch.device("cuda"),
            "accelerator.convolutions=true: cuDNN's Python API found no cuDNN library (Unable to find symbol "
            "cudnnGetVersion); it loads the one torch ships",
        ),
    ],
)
def test_float8_convolutions_are_refused_in_one_line_where_they_cannot_run(options, device, refusal, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    options = dict(options)  # parametrize shares its dict: not changed in place
    if options.pop("unloaded", False):  # installed, but no libcudnn beside it (as on this CPU machine)
        monkeypatch.setitem(sys.modules, "cudnn", types.SimpleNamespace(backend_version=no_library))
    else:
        monkeypatch.setitem(sys.modules, "cudnn", None)  # not installed: its import fails
    with pytest.raises(ConfigError) as raised:
        Float8Accelerator(**options).check(device)
    assert str(raised.value).startswith(refusal) and "\n" not in str(raised.value)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("channels", "kernel", "stride", "size"), [(320, 3, 1, 64), (640, 3, 2, 32), (640, 1, 1, 32)])
def test_cudnns_float8_kernel_gives_the_cpus_numbers_compiled_and_graphed(channels, kernel, stride, size, dtype):
    """cuDNN's float8 convolution against the operator's own arithmetic (float8 operands widened, float32
    products), eager, compiled by inductor and captured in a CUDA graph; and within float8's error of the
    16-bit convolution."""
    pytest.importorskip("cudnn", reason="pip install nvidia-cudnn-frontend")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, 2 * channels, kernel, stride=stride, padding=kernel // 2)
    conv = conv.to("cuda", dtype)
    x = torch.randn(2, channels, size, size, device="cuda", dtype=dtype).contiguous(memory_format=torch.channels_last)
    layer = CalibratedFloat8Conv2d(conv, x.abs().amax())
    with torch.no_grad():
        quantised = (x.float() * layer.input_inverse).clamp(-448, 448).to(torch.float8_e4m3fn)
        reference = F.conv2d(quantised.float(), layer.weight_fp8.float(), stride=stride, padding=kernel // 2)
        reference = reference * layer.scale + conv.bias.float().view(1, -1, 1, 1)
        eager = layer(x)
        graphed = GraphedModule(torch.compile(layer), warmup_calls=2)(x)
        assert relative_error(eager, reference) < 5e-3  # float32 sums in another order, rounded to 16 bits
        assert relative_error(graphed, eager) < 1e-3  # inductor's fused quantisation may round one input apart
        assert relative_error(eager, conv(x)) < 0.06


def test_the_kernel_benchmark_times_sdxls_own_convolution_shapes() -> None:
    """benchmarks/fp8_conv.py finds its shapes by running SDXL's UNet on the meta device: every convolution but the
    first and last (4 channels), at the latent's three levels, with how often a step runs each."""
    from fp8_conv import conv_shapes

    shapes = conv_shapes(1024)
    assert sum(shapes.values()) == 49  # of the UNet's 51 convolutions
    assert shapes[((2, 320, 128, 128), 320, 3, 1, 1)] == 7 and shapes[((2, 1280, 32, 32), 1280, 3, 1, 1)] == 10
    assert shapes[((2, 320, 128, 128), 320, 3, 2, 1)] == 1  # a downsampler
    assert {size[2] for size, *_ in shapes} == {128, 64, 32}
    assert {size[2] for size, *_ in conv_shapes(512)} == {64, 32, 16}


def test_a_shape_cudnn_builds_no_kernel_for_fails_naming_it_and_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.accelerators import float8_conv
    from runner.errors import RunnerError

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("cudnnGraphNotSupportedError: No valid execution plans built.")

    monkeypatch.setattr(float8_conv, "build_plan", refuse)
    image = torch.zeros(2, 32, 8, 8).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(64, 32, 3, 3).to(torch.float8_e4m3fn).contiguous(memory_format=torch.channels_last)
    with pytest.raises(RunnerError) as raised:
        float8_conv.plan_for(image, weight, [1, 1], [1, 1], torch.float16, "scale_bias")
    assert str(raised.value) == (
        "accelerator.convolutions=true: cuDNN built no float8 kernel for a convolution of [2, 32, 8, 8] by "
        "[64, 32, 3, 3] (stride [1, 1], padding [1, 1]) writing torch.float16; drop accelerator.convolutions, or "
        "time the shapes with benchmarks/fp8_conv.py (cuDNN said RuntimeError: cudnnGraphNotSupportedError: No "
        "valid execution plans built.)"
    )
