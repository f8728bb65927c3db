"""fused_geglu: SDXL's GEGLU feed-forward as one custom operator (one Triton kernel on a GPU), diffusers' own
arithmetic on a CPU; traceable by torch.compile; refused in one line where it cannot stand."""

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_model
from diffusers.models.activations import GEGLU
from hopper_build import HOPPER_SHARED_MEMORY, compile_for_hopper, serialised, tma_build
from torch.utils._python_dispatch import TorchDispatchMode

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain
from runner.accelerators.fused_geglu import KERNELS, addressable, geglu, geglu_reference
from runner.accelerators.precompile import PrecompiledModule
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
FUSED = {"_target_": "runner.accelerators.fused_geglu.FusedGegluAccelerator"}


def target(tmp_path: Path, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> Target:
    return Target("unet", device, dtype, tmp_path, "tiny-random-64x64")


def image(pipe, device: torch.device) -> np.ndarray:
    generator = torch.Generator(device).manual_seed(0)
    return np.asarray(pipe("a cat", num_inference_steps=2, generator=generator, output_type="np").images[0])


def test_the_fused_feed_forward_makes_diffusers_images(tmp_path: Path) -> None:
    """On the CPU the operator runs diffusers' arithmetic, so the swap of every GEGLU changes nothing."""
    expected = image(build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32), CPU)
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = build_accelerator(FUSED)
    accelerator.check(CPU)
    accelerator.apply(pipe, target(tmp_path))
    layers = [module for module in pipe.unet.modules() if isinstance(module, GEGLU)]
    assert layers and type(layers[0]).__name__ == "GEGLU"  # named as before, in logs and saved configs
    assert accelerator.tags() == {"fused_geglu": f"{len(layers)} (pointers)"}
    np.testing.assert_array_equal(image(pipe, CPU), expected)


def test_the_operator_traces_and_compiles() -> None:
    """Its fake kernel gives torch.compile the output's shape, so a whole graph holds it."""
    x, weight, bias = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12)
    torch.library.opcheck(geglu, (x, weight, bias))
    torch.library.opcheck(geglu, (x, weight, None, "tma"))
    layer = GEGLU(8, 6)
    expected = layer(x)
    build_accelerator(FUSED).apply(types.SimpleNamespace(unet=layer), target(Path(".")))
    compiled = torch.compile(layer, fullgraph=True)  # inductor's lowering too: it broke on an argument's name
    with torch.no_grad():  # as pipelines run: the operator has no backward
        torch.testing.assert_close(compiled(x), expected)


def test_products_of_fewer_rows_than_min_rows_run_diffusers_two_passes(tmp_path: Path) -> None:
    """The operator runs for products of ``min_rows`` rows (tokens x batch) or more, diffusers' forward below:
    which one ran is told by the operators dispatched, as both compute the same on a CPU."""
    layer = GEGLU(8, 8)
    accelerator = build_accelerator(FUSED | {"kernel": "tma", "min_rows": 6})
    accelerator.apply(types.SimpleNamespace(unet=layer), target(tmp_path))
    assert accelerator.tags() == {"fused_geglu": "1 (tma, 6 rows or more)"}

    class Dispatched(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ran.append(str(func))
            return func(*args, **(kwargs or {}))

    for batch, tokens, fused in [(2, 3, True), (1, 5, False), (3, 2, True)]:
        x = torch.randn(batch, tokens, 8)
        ran: list[str] = []
        with Dispatched():
            out = layer(x)
        assert ("runner.geglu.default" in ran) == fused, (batch, tokens, ran)
        torch.testing.assert_close(out, geglu_reference(x, layer.proj.weight, layer.proj.bias))
        torch.testing.assert_close(torch.compile(layer, fullgraph=True, backend="eager")(x), out)  # traced either way
    with pytest.raises(ConfigError, match=r"^accelerator.min_rows=-1: must be 0 or more"):
        build_accelerator(FUSED | {"min_rows": -1}).check(CPU)


def test_the_tma_kernel_gets_rows_it_can_address_or_a_copy() -> None:
    """An input TMA cannot address (a view starting mid-row, or strided) is copied into rows of its own, so that a
    run named tma times the tma kernel, not the other kernel as the launcher did before; others pass as they are,
    and the pointers kernel, which reads any rows, takes every input as it is."""
    tma, pointers = KERNELS["tma"].fits, KERNELS["pointers"].fits
    weight, out = torch.randn(32, 16, dtype=torch.float16), torch.empty(4, 16, dtype=torch.float16)
    rows = torch.randn(4, 16, dtype=torch.float16)
    assert addressable(rows, weight, out, tma) is rows
    for unaddressable in (torch.randn(4 * 16 + 1, dtype=torch.float16)[1:].view(4, 16), torch.randn(16, 4).half().T):
        assert not tma(unaddressable, weight, out)
        copied = addressable(unaddressable, weight, out, tma)
        assert tma(copied, weight, out)
        torch.testing.assert_close(copied, unaddressable, rtol=0, atol=0)
        assert addressable(unaddressable, weight, out, pointers) is unaddressable


def test_the_tma_launcher_refuses_what_it_cannot_address_instead_of_running_the_other_kernel() -> None:
    """Where Triton is installed (not in CI; the GPU machine has it): the refusal comes before any kernel runs."""
    pytest.importorskip("triton")
    from runner.accelerators.geglu_kernels import launch

    weight, out = torch.randn(32, 16, dtype=torch.float16), torch.empty(4, 16, dtype=torch.float16)
    mid_row = torch.randn(4 * 16 + 1, dtype=torch.float16)[1:].view(4, 16)
    with pytest.raises(ValueError, match=r"^the tma kernel cannot address .*use the pointers kernel$"):
        launch(mid_row, weight, None, out, "tma")


def test_a_precompiled_unet_with_the_fused_forward_is_saved_under_its_own_key(tmp_path: Path) -> None:
    """The swapped class keeps GEGLU's name and so its repr: the key must still tell them apart, or a precompiled
    unfused UNet (or one with the other kernel) would be loaded for the fused one."""
    signature = ("spec", ((2, 8), "torch.float32", "cpu", (8, 1)))
    keys = {PrecompiledModule(torch.nn.Sequential(GEGLU(8, 8)), tmp_path, "denoiser").path(signature)}
    variants = [{"kernel": kernel} for kernel in KERNELS] + [{"kernel": "tma", "min_rows": 1024}]
    for variant in variants:
        fused = torch.nn.Sequential(GEGLU(8, 8))
        build_accelerator(FUSED | variant).apply(types.SimpleNamespace(unet=fused), target(tmp_path))
        assert repr(fused) == repr(torch.nn.Sequential(GEGLU(8, 8)))
        keys.add(PrecompiledModule(fused, tmp_path, "denoiser").path(signature))
    assert len(keys) == 1 + len(variants)


def test_refused_without_a_geglu_or_after_its_projection_was_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(
        ConfigError, match=r"^fused_geglu: Linear has no GEGLU feed-forward.*accelerator=compile_graph$"
    ):
        build_accelerator(FUSED).apply(types.SimpleNamespace(unet=torch.nn.Linear(4, 4)), target(tmp_path))
    layer = GEGLU(8, 6)
    layer.proj = torch.nn.Identity()  # as float8's layers replace it
    with pytest.raises(ConfigError, match=r"projection is a Identity, not a torch.nn.Linear; put FusedGeglu"):
        build_accelerator(FUSED).apply(types.SimpleNamespace(unet=layer), target(tmp_path))
    with pytest.raises(
        ConfigError, match=r"^accelerator.kernel=wgmma: fused_geglu's kernels are pointers, tma, or auto$"
    ):
        build_accelerator(FUSED | {"kernel": "wgmma"}).check(CPU)
    # Rows TMA cannot address would run the pointers kernel under tma's name: refused, naming the fix.
    narrow = types.SimpleNamespace(unet=GEGLU(12, 16))  # 12 float16 inputs: 24 bytes, not a multiple of 16
    with pytest.raises(
        ConfigError,
        match=r"^accelerator.kernel=tma: .* rows of 12 inputs and 16 outputs in torch.float16 .*; use kernel=pointers$",
    ):
        build_accelerator(FUSED | {"kernel": "tma"}).apply(narrow, target(tmp_path, dtype=torch.float16))
    build_accelerator(FUSED).apply(narrow, target(tmp_path, dtype=torch.float16))  # pointers takes any rows
    # Before Hopper there is no TMA: refused before the first call, not by Triton inside the warmup.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError) as raised:
        build_accelerator(FUSED | {"kernel": "tma"}).check(torch.device("cuda"))
    assert str(raised.value) == (
        "accelerator.kernel=tma needs Hopper's tensor memory accelerator (compute capability 9.0 or newer); "
        "NVIDIA A100-SXM4-80GB has 8.0: use kernel=pointers, or kernel=auto, which leaves diffusers' GEGLU there "
        "(as accelerator=compile_graph_fast does)"
    )
    fits = types.SimpleNamespace(unet=GEGLU(16, 16))
    build_accelerator(FUSED | {"kernel": "tma"}).apply(fits, target(tmp_path, dtype=torch.float16))


@pytest.mark.parametrize(
    ("device", "capability", "tag"),
    [
        ("cuda", (9, 0), "2 (tma, 1024 rows or more)"),
        (
            "cuda",
            (10, 0),
            "none: kernel=auto runs tma on compute capability 9.x only, where it was measured faster; "
            "not on NVIDIA B200 (compute capability 10.0)",
        ),
        (
            "cuda",
            (8, 0),
            "none: kernel=auto runs tma on compute capability 9.x only, where it was measured faster; "
            "not on NVIDIA A100-SXM4-80GB (compute capability 8.0)",
        ),
        (
            "cpu",
            None,
            "none: kernel=auto runs tma on compute capability 9.x only, where it was measured faster; not on the cpu",
        ),
    ],
)
def test_auto_runs_the_tma_kernel_on_hopper_only_and_leaves_diffusers_geglu_elsewhere(
    device: str, capability: tuple[int, int] | None, tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compile_graph_fast's choice: the kernel where it was measured faster (an H200), diffusers' GEGLU on every
    other device, with nothing to refuse there; the run's tag says which."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    names = {(9, 0): "NVIDIA H200", (10, 0): "NVIDIA B200", (8, 0): "NVIDIA A100-SXM4-80GB"}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[capability])
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))  # check imports it for the kernel
    unet = torch.nn.Sequential(GEGLU(16, 16), GEGLU(32, 16))
    accelerator = build_accelerator(FUSED | {"kernel": "auto", "min_rows": 1024})
    accelerator.check(torch.device(device))
    accelerator.apply(types.SimpleNamespace(unet=unet), target(tmp_path, torch.device(device), torch.float16))
    assert accelerator.tags() == {"fused_geglu": tag}
    swapped = [type(layer).forward is not GEGLU.forward for layer in unet]
    assert swapped == [capability == (9, 0)] * 2
    # Rows TMA cannot address (kernel=tma refuses them): auto leaves diffusers' GEGLU there too.
    narrow = torch.nn.Sequential(GEGLU(16, 16), GEGLU(12, 16))  # 12 float16 inputs: 24 bytes
    accelerator.apply(types.SimpleNamespace(unet=narrow), target(tmp_path, torch.device(device), torch.float16))
    assert all(type(layer).forward is GEGLU.forward for layer in narrow)
    if capability == (9, 0):
        assert accelerator.tags() == {
            "fused_geglu": "none: kernel=auto: Hopper's tensor memory accelerator cannot address a GEGLU's rows "
            "of 12 inputs and 16 outputs in torch.float16"
        }


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_every_configuration_of_both_kernels_compiles_for_hopper(dtype: str) -> None:
    """Triton's compiler, not its interpreter, builds every block size of both kernels for sm_90 and each fits in
    an SM's shared memory; no GPU is needed up to the binary. The interpreter had run a loop the compiler
    refuses (the tma kernel's first GPU run failed to compile). And what geglu_kernels.LOOPS says of the tma
    kernel's loops holds: ptxas serialises the flat ones' tensor-core instructions, not the nested ones', and
    the warp-specialised ones are built as the nested ones. Skipped where Triton is not installed, as on this
    project's CPU machines (benchmarks/hopper_build.py)."""
    pytest.importorskip("triton")
    from runner.accelerators.geglu_kernels import (
        BLOCKS,
        CONFIGS,
        LAUNCHERS,
        LOOPS,
        pointers_kernel,
        settings,
        tma_kernel,
    )

    pointers = dict.fromkeys(["x", "w", "b", "out"], f"*{dtype}") | dict.fromkeys(["M", "N", "K"], "i32")
    pointers |= dict.fromkeys(["stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_om", "stride_on"], "i32")
    kernels = {"pointers": pointers_kernel, "tma": tma_kernel}
    assert set(kernels) == set(LAUNCHERS) == set(CONFIGS) == set(KERNELS)  # names written in both modules
    # Every tma tile in each loop, in its table or not (Triton's Hopper pass refuses to specialise 4 warps).
    loops = [(*block, loop) for block in BLOCKS for loop in LOOPS if loop != "specialised" or block[4] == 8]
    assert set(CONFIGS["tma"]) <= set(loops)
    every = [("pointers", config) for config in CONFIGS["pointers"]] + [("tma", config) for config in loops]
    ptx = {}
    for kernel, config in every:
        meta = settings(*config)
        if kernel == "pointers":
            options = {"num_stages": meta.pop("num_stages"), "num_warps": meta.pop("num_warps")}
            build = (pointers, {"HAS_BIAS": True} | meta, options)
        else:
            build = tma_build(dtype, meta)
        binary, report = compile_for_hopper(kernels[kernel], *build)
        assert binary.metadata.shared <= HOPPER_SHARED_MEMORY, (kernel, config)
        if kernel == "tma":
            assert serialised(report) == (config[-1] == "flat"), (config, report)
            ptx[config] = binary.asm["ptx"]
    for config in [config for config in loops if config[-1] == "specialised"]:
        assert ptx[config] == ptx[(*config[:-1], "nested")], config  # Triton 3.6 specialises no warps here


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2048, 640, 2560), (512, 1280, 5120), (200, 104, 80), (130, 64, 192)])
def test_the_kernel_computes_diffusers_geglu_up_to_rounding(
    kernel: str, dtype: torch.dtype, shape: tuple[int, int, int]
) -> None:
    """SDXL's shapes and ragged ones, every block size of each kernel and the autotuned operator: no further from
    a float32 computation than diffusers' own arithmetic in ``dtype``, give or take one rounding."""
    from runner.accelerators.geglu_kernels import CONFIGS, launch, settings  # imports Triton

    rows, width, inner = shape
    torch.manual_seed(0)
    x = torch.randn(rows, width, device="cuda", dtype=dtype)
    weight = (torch.randn(2 * inner, width, device="cuda") / width**0.5).to(dtype)
    bias = (torch.randn(2 * inner, device="cuda") * 0.1).to(dtype)
    exact = geglu_reference(x.float(), weight.float(), bias.float())
    allowed = (geglu_reference(x, weight, bias).float() - exact).abs().max().item() * 2 + exact.abs().max().item() / 256
    for config in CONFIGS[kernel]:
        out = torch.empty(rows, inner, device="cuda", dtype=dtype)
        launch(x, weight, bias, out, kernel, **settings(*config))
        assert (out.float() - exact).abs().max().item() <= allowed, config
    assert (geglu(x, weight, bias, kernel).float() - exact).abs().max().item() <= allowed
    unbiased = geglu(x, weight, None, kernel).float() - geglu_reference(x.float(), weight.float(), None)
    assert unbiased.abs().max().item() <= allowed


@pytest.mark.gpu
def test_the_fused_unet_compiles_and_captures_on_a_gpu(tmp_path: Path) -> None:
    """The operator inside a compiled UNet captured as a CUDA graph: its images stay those of diffusers' UNet
    compiled and captured the same way, up to rounding."""
    cuda = torch.device("cuda")
    parts = [
        {"_target_": "runner.accelerators.torch_compile.TorchCompileAccelerator", "compile_vae": False},
        {"_target_": "runner.accelerators.cuda_graph.CudaGraphAccelerator"},
    ]
    results = []
    chains = [Chain(parts=parts)] + [Chain(parts=[FUSED | {"kernel": kernel}, *parts]) for kernel in KERNELS]
    for chain in chains:
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", cuda, torch.float16)
        chain.check(cuda)
        chain.apply(pipe, target(tmp_path, cuda, torch.float16))
        image(pipe, cuda)  # the warmup: compiles, autotunes, captures
        results.append(image(pipe, cuda))
    for fused in results[1:]:
        np.testing.assert_allclose(fused, results[0], atol=2e-2)
