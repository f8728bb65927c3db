"""float8's fuse_geglu: a feed-forward's GEGLU product, GELU, gating and the quantisation of the output layer's input
as one custom operator (one Triton kernel on a GPU, float32 arithmetic elsewhere); the module swap, its counts
and refusals on the CPU, the kernel against that arithmetic on a GPU."""

import dataclasses
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model
from diffusers.models.attention import FeedForward
from float8_kernel_errors import inputs, steps
from hopper_build import HOPPER_SHARED_MEMORY, compile_for_hopper, float8_build, serialised

from runner.accelerators import Target
from runner.accelerators.cuda_graph import GraphedModule
from runner.accelerators.float8 import FLOAT8, CalibratedFloat8Linear, Float8Accelerator, input_amax, quantise, scale_of
from runner.accelerators.float8_geglu import Float8GegluFeedForward, float8_geglu, float8_geglu_reference
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
TINY_CALL = {"num_inference_steps": 2, "height": 64, "width": 64, "output_type": "np"}


def float8_feed_forward(dim: int, x: torch.Tensor) -> tuple[FeedForward, Float8GegluFeedForward]:
    """A diffusers GEGLU feed-forward with both its layers in calibrated float8 (calibrated on ``x``), and the
    same layers fused."""
    torch.manual_seed(0)
    ff = FeedForward(dim, activation_fn="geglu").to(x.device, x.dtype).eval()
    layers = [ff.net[0].proj, ff.net[2]]
    amaxes = input_amax(layers, lambda: ff(x))
    ff.net[0].proj, ff.net[2] = (
        CalibratedFloat8Linear(layer, amax) for layer, amax in zip(layers, amaxes, strict=True)
    )
    return ff, Float8GegluFeedForward(ff.net[0].proj, ff.net[2])


def relative(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def test_the_fused_feed_forward_is_the_two_float8_layers_up_to_rounding() -> None:
    """In float32 both ways compute the same: the product unrounded, the GELU and gating, the quantisation with
    the output layer's scale; only the order of the sums may differ. Inductor traces the operator as one call."""
    torch.manual_seed(0)
    x = torch.randn(2, 77, 64)  # rows not a multiple of 16: padded and cut again
    ff, fused = float8_feed_forward(64, x)
    with torch.no_grad():
        apart, together = ff(x), fused(x)
        compiled = torch.compile(fused, backend="inductor", dynamic=False)(x)
    assert together.shape == apart.shape == x.shape
    assert relative(together, apart) < 1e-3
    assert relative(compiled, together) < 1e-3
    fused.half()  # a later cast of the model casts its bias, not its float8 matrices or float32 scales
    assert fused.product_scale.dtype == torch.float32 and fused.proj.weight_fp8.dtype == FLOAT8
    with torch.no_grad():  # float16's input and bias move some values to a neighbouring float8 one: 0.7-1.4% over
        assert relative(fused(x.half()), together) < 0.05  # 30 seeds (float16 matrices: _scaled_mm refuses them)


def test_the_operator_quantises_with_the_next_layers_scale_and_saturates() -> None:
    """Values beyond e4m3's range after the next layer's scale become its largest (448), not NaN, as they do
    where the two layers run apart."""
    x = quantise(torch.randn(32, 64), torch.tensor(100.0))
    weight = quantise(torch.randn(96, 64) / 8, torch.tensor(100.0))
    scale, inverse, bias = torch.tensor(1e-4), torch.tensor(1e4), torch.randn(96) * 0.1
    out = float8_geglu(x, weight, scale, inverse, bias, fast=False)
    assert out.dtype == FLOAT8 and out.shape == (32, 48)
    product = (x.float() @ weight.float().t()) * scale + bias
    hidden, gate = product.chunk(2, dim=-1)
    beyond = (hidden * torch.nn.functional.gelu(gate) * inverse).abs() > 448
    assert beyond.any() and not beyond.all()
    assert out.float().isfinite().all() and (out.float()[beyond].abs() == 448).all()


def calibrated_target(tmp_path: Path, pipe) -> Target:
    base = Target("unet", CPU, torch.float32, tmp_path, "tiny_sdxl-random-t2i-64x64-fp32")
    return dataclasses.replace(base, calibration=lambda _: pipe(prompt="a", **TINY_CALL))


def test_fuse_geglu_fuses_every_feed_forward_of_the_blocks_and_says_how_many(tmp_path: Path) -> None:
    def images(fuse: bool) -> tuple[np.ndarray, Float8Accelerator]:
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
        accelerator = Float8Accelerator(scaling="calibrated", include=["ff."], fuse_geglu=fuse)
        accelerator.check(CPU)
        accelerator.apply(pipe, calibrated_target(tmp_path, pipe))
        generator = torch.Generator().manual_seed(0)
        return pipe(prompt="a cat", generator=generator, **TINY_CALL).images[0], accelerator

    apart, _ = images(False)
    together, accelerator = images(True)
    assert accelerator.metrics() == {"float8_linears": 8.0, "float8_geglus_fused": 4.0}
    assert accelerator.tags()["float8_geglus_left"] == "0"
    assert np.abs(together - apart).max() < 0.02  # the same layers, the product no longer rounded to 16 bits


def test_fuse_geglu_leaves_a_feed_forward_whose_layers_are_not_both_float8(tmp_path: Path) -> None:
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = Float8Accelerator(scaling="calibrated", include=["attn1.", "ff.net.0"], fuse_geglu=True)
    with pytest.raises(ConfigError) as raised:
        accelerator.apply(pipe, calibrated_target(tmp_path, pipe))
    assert str(raised.value) == (
        "accelerator.fuse_geglu=true: none of the denoiser's 4 GEGLU feed-forwards has both its GEGLU's product "
        "and its output layer in float8 (include=['attn1.', 'ff.net.0']): include both, e.g. include=[ff.], or "
        "drop fuse_geglu"
    )
    assert not any(isinstance(module, Float8GegluFeedForward) for module in pipe.unet.modules())


def test_fuse_geglu_refuses_what_it_cannot_run_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as raised:
        Float8Accelerator(fuse_geglu=True).check(CPU)
    assert str(raised.value) == (
        "accelerator.fuse_geglu=true quantises the GEGLU's output with the next layer's calibrated scale, and this "
        "is scaling=rowwise: add accelerator.scaling=calibrated, or drop fuse_geglu"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    with pytest.raises(ConfigError) as raised:
        Float8Accelerator(scaling="calibrated", fuse_geglu=True).check(torch.device("cuda"))
    assert str(raised.value) == (
        "accelerator.fuse_geglu=true runs a kernel fed by Hopper's tensor memory accelerator (compute capability "
        "9.0 or newer); NVIDIA L4 has 8.9: drop fuse_geglu on this GPU"
    )
    Float8Accelerator(scaling="calibrated").check(torch.device("cuda"))  # float8 itself runs there


def test_fuse_geglu_auto_fuses_on_hopper_only_and_says_why_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp8_compile's fuse_geglu=auto: the kernel where it was measured faster (Hopper, Triton there), the layers
    apart elsewhere, with a tag saying why; float8 itself runs as before."""
    auto = Float8Accelerator(scaling="calibrated", include=["ff."], fuse_geglu="auto")
    assert auto._fuses_geglus(CPU) == (
        False,
        "fuse_geglu=auto fuses on Hopper GPUs (compute capability 9.x) only, where it was measured faster; not on "
        "the cpu",
    )
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    auto.check(CPU)
    auto.apply(pipe, calibrated_target(tmp_path, pipe))
    assert auto.metrics() == {"float8_linears": 8.0}
    assert auto.tags()["float8_geglu"] == f"layers apart: {auto._fuses_geglus(CPU)[1]}"
    assert not any(isinstance(module, Float8GegluFeedForward) for module in pipe.unet.modules())

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    auto.check(cuda)  # no refusal: auto leaves Ada's feed-forwards apart
    assert auto._fuses_geglus(cuda) == (
        False,
        "fuse_geglu=auto fuses on Hopper GPUs (compute capability 9.x) only, where it was measured faster; not on "
        "NVIDIA L4 (compute capability 8.9)",
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert auto._fuses_geglus(cuda) == (True, "")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton then raises ImportError
    fuses, why = auto._fuses_geglus(cuda)
    assert not fuses and why.startswith("fuse_geglu=auto: Triton is not installed (")


def test_fuse_geglu_auto_runs_float8_where_no_feed_forward_can_fuse(tmp_path: Path) -> None:
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    auto = Float8Accelerator(scaling="calibrated", include=["attn1.", "ff.net.0"], fuse_geglu="auto")
    auto._fuses_geglus = lambda device: (True, "")  # as on a Hopper GPU
    auto.apply(pipe, calibrated_target(tmp_path, pipe))
    assert auto.tags()["float8_geglu"] == (
        "layers apart: fuse_geglu=auto: none of the denoiser's 4 GEGLU feed-forwards has both its GEGLU's product "
        "and its output layer in float8 (include=['attn1.', 'ff.net.0'])"
    )
    assert auto.metrics() == {"float8_linears": 20.0, "float8_geglus_fused": 0.0}  # attn1. has four each


def test_fuse_geglu_takes_true_false_or_auto_in_one_line() -> None:
    with pytest.raises(ConfigError) as raised:
        Float8Accelerator(scaling="calibrated", fuse_geglu="yes").check(CPU)
    assert str(raised.value) == (
        "accelerator.fuse_geglu=yes: choose true, false or auto (the fused kernel on Hopper GPUs, where it was "
        "measured faster; the layers apart elsewhere)"
    )
    with pytest.raises(ConfigError) as raised:
        Float8Accelerator(fuse_geglu="auto").check(CPU)
    assert str(raised.value).startswith("accelerator.fuse_geglu=auto quantises the GEGLU's output with the next")


@pytest.mark.parametrize("fast", [True, False])
def test_every_configuration_of_the_float8_kernel_compiles_for_hopper(fast: bool) -> None:
    """Triton's compiler builds every block size of the float8 kernel for sm_90, each within an SM's shared memory;
    no GPU is needed up to the binary. With fast accumulation (fp8_fast_bf16's), ptxas serialises the
    tensor-core instructions of none (as it does the flat loop's: geglu_kernels.LOOPS); promoted, the sums are
    read at every tile's depth by design. A warp-specialised build would be a nested one again. Skipped where
    Triton is not installed (benchmarks/hopper_build.py)."""
    pytest.importorskip("triton")
    from runner.accelerators.geglu_kernels import FLOAT8_CONFIGS, float8_kernel, settings

    for config in FLOAT8_CONFIGS:
        binary, report = compile_for_hopper(float8_kernel, *float8_build(fast, settings(*config)))
        assert binary.metadata.shared <= HOPPER_SHARED_MEMORY, config
        assert not (fast and serialised(report)), (config, report)
    flat, specialised = (settings(*FLOAT8_CONFIGS[0][:-1], loop) for loop in ("flat", "specialised"))
    assert serialised(compile_for_hopper(float8_kernel, *float8_build(fast, flat))[1]) == fast  # as LOOPS says
    nested = compile_for_hopper(float8_kernel, *float8_build(fast, settings(*FLOAT8_CONFIGS[0])))[0]
    specialised = compile_for_hopper(float8_kernel, *float8_build(fast, specialised))[0]
    assert specialised.asm["ptx"] == nested.asm["ptx"]  # so the table has no "specialised" twin of a nested build


def test_the_reference_sums_as_cublas_where_asked() -> None:
    """``fast`` set, the reference's product is torch's scaled float8 matrix product (what the GPU test holds the
    kernel to); on the CPU its sums are float32's, so it gives the float32 arithmetic's values, up to a float8 step
    (another CPU may sum in another order). Rows and columns as a layer's, the weight transposed as the product
    wants it."""
    torch.manual_seed(0)
    x, weight = torch.randn(48, 64), torch.randn(2 * 32, 64) / 8
    x8, weight8 = quantise(x, 1 / scale_of(x.abs().amax())), quantise(weight, 1 / scale_of(weight.abs().amax()))
    scale, inverse, bias = torch.tensor(0.01), torch.tensor(8.0), torch.randn(2 * 32).half()
    exact = float8_geglu_reference(x8, weight8, scale, inverse, bias)
    assert exact.shape == (48, 32) and exact.float().abs().max() > 1
    for fast in (True, False):
        summed = float8_geglu_reference(x8, weight8, scale, inverse, bias, fast)
        assert within_one_float8_step(summed, exact) and (summed.float() != exact.float()).float().mean() < 0.01


def within_one_float8_step(got: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether each value is the expected one or a neighbour of it in e4m3 (3 mantissa bits: a step is at most
    an eighth of the value, 2^-9 among the smallest)."""
    got, expected = got.float(), expected.float()
    return bool(((got - expected).abs() <= expected.abs() / 8 + 2**-9).all())


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("shape", [(8192, 640, 2560), (2048, 1280, 5120), (512, 1280, 5120), (208, 96, 80)])
def test_the_float8_kernel_computes_the_operators_arithmetic(fast: bool, shape: tuple[int, int, int]) -> None:
    """SDXL's feed-forward shapes at 1024 and 512 px and a ragged one, every block size and the autotuned
    operator, against cuBLAS's float8 product (``fast``: its fast accumulation) with the float32 GELU, and against the
    exact float32 arithmetic. Hopper's float8 sums differ from exact ones where they cancel (1.6% of values a step or
    more, cuBLAS's as the kernel's: BENCHMARKS.md, "Float8's fused GEGLU on its first GPU"; this test first held the
    kernel to the exact sums and failed), so: never less exact than cuBLAS's (as many values off the exact ones, or
    fewer), few off at all; and where the kernel promotes its sums as cuBLAS does, cuBLAS's values or their
    neighbours, hardly any moved (on an H200, at most 14 of 21 million). With promoted sums the kernel adds each
    tile's depth (``BLOCK_K``) into float32 and cuBLAS each 128 (its 128-deep tiles give cuBLAS's sums value for
    value), so its 64-deep tile sums more exactly than cuBLAS, 119,108 values a step or more off the exact ones
    against 192,734 at 1024 px's 64x64 shape on an H100 (BENCHMARKS.md, "Float8's fast accumulation and fused
    GEGLU in fp8_compile"), which the second version of this test, holding it to cuBLAS's values, failed on."""
    from runner.accelerators.geglu_kernels import FLOAT8_CONFIGS, launch_float8, settings  # imports Triton

    rows, width, inner = shape
    x8, weight8, scale, inverse, bias = inputs(rows, width, inner)
    expected = float8_geglu_reference(x8, weight8, scale, inverse, bias, fast)  # Hopper's float8 sums, cuBLAS's
    exact = float8_geglu_reference(x8, weight8, scale, inverse, bias)
    cublas_off = steps(expected, exact)
    for config in FLOAT8_CONFIGS:
        out = torch.empty(rows, inner, device="cuda", dtype=FLOAT8)
        launch_float8(x8, weight8, scale, inverse, bias, out, fast, **settings(*config))
        off = steps(out, exact)
        for least in (1, 2):  # off by a step or more, by two or more: no more values than cuBLAS's
            assert (off >= least).sum().item() <= (cublas_off >= least).sum().item() + 1e-5 * off.numel(), config
        assert (off > 0).float().mean().item() < 0.05, config
        block_k = config[2]
        if fast or block_k >= 128:  # promoted as cuBLAS's are: its sums
            assert within_one_float8_step(out, expected), config
            assert (out.float() != expected.float()).float().mean().item() < 1e-5, config
    assert within_one_float8_step(float8_geglu(x8, weight8, scale, inverse, bias, fast), expected)
    assert within_one_float8_step(
        float8_geglu(x8, weight8, scale, inverse, None, fast),
        float8_geglu_reference(x8, weight8, scale, inverse, None, fast),
    )


@pytest.mark.gpu
def test_the_fused_feed_forward_compiled_and_graphed_is_the_two_layers_on_the_gpu() -> None:
    """The operator inside inductor's graph, captured: SDXL's 1024 px feed-forward in fp16, the same as the two
    float8 layers apart up to rounding."""
    x = torch.randn(2, 4096, 640, device="cuda", dtype=torch.float16)
    ff, fused = float8_feed_forward(640, x)
    with torch.no_grad():
        apart = ff(x)
        graphed = GraphedModule(torch.compile(fused, dynamic=False), warmup_calls=2)
        together = graphed(x)
    assert relative(together, apart) < 0.02  # the GELU takes the product in float32 instead of fp16
