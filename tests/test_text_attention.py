"""text_attention: SDXL's cross-attentions over the text as one custom operator (a Triton kernel on a GPU), diffusers'
arithmetic on a CPU: the same images, beside fused projections, compilation, saved compiled modules and text_kv; its
kernel right in Triton's interpreter and built for Hopper without spilling; refused in one line where nothing is
swapped."""

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PRECOMPILED_ON_CPU, load_model
from diffusers.models.attention_processor import Attention

from runner.accelerators import Target, build_accelerator
from runner.accelerators.chain import Chain
from runner.accelerators.text_attention import text_attention, text_attention_reference
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")
TEXT_ATTENTION = {"_target_": "runner.accelerators.text_attention.TextAttentionAccelerator"}
TEXT_KV = {"_target_": "runner.accelerators.text_kv.TextKeysOnceAccelerator"}
PROMPTS = ("a red bicycle leaning on a wall", "a lighthouse at night, long exposure")
REPO = Path(__file__).resolve().parents[1]


def images(pipe, prompt: str, device: torch.device = CPU) -> np.ndarray:
    generator = torch.Generator(device).manual_seed(7)
    call = {"num_inference_steps": 3, "height": 64, "width": 64, "output_type": "np", "generator": generator}
    return pipe(prompt, **call).images


def target(tmp_path: Path, device: torch.device = CPU, dtype: torch.dtype = torch.float32) -> Target:
    return Target("unet", device, dtype, tmp_path, f"tiny_sdxl-random-t2i-64x64-{dtype}")


def cross_attentions(unet: torch.nn.Module) -> list[Attention]:
    return [module for module in unet.modules() if isinstance(module, Attention) and module.is_cross_attention]


def test_the_swapped_cross_attentions_make_diffusers_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the CPU the operator runs diffusers' arithmetic, so swapping every cross-attention changes nothing (and
    the operator did run, once per cross-attention a step); the modules keep their class's name (logs, saved
    configs) and the self-attentions are left as they were."""
    expected = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    wanted = [images(expected, prompt) for prompt in PROMPTS]
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = build_accelerator(TEXT_ATTENTION)
    accelerator.check(CPU)
    accelerator.apply(pipe, target(tmp_path))
    swapped = cross_attentions(pipe.unet)
    assert swapped and all(type(module).__name__ == "Attention" for module in swapped)
    assert all(getattr(module, "named_like", "") == "text_attention" for module in swapped)
    others = [
        module for module in pipe.unet.modules() if isinstance(module, Attention) and not module.is_cross_attention
    ]
    assert others and all(type(module) is Attention for module in others)
    assert accelerator.tags() == {"text_attention": str(len(swapped))}
    calls = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return text_attention_reference(*args)

    monkeypatch.setattr("runner.accelerators.text_attention.text_attention_reference", counted)
    for prompt, want in zip(PROMPTS, wanted, strict=True):
        np.testing.assert_array_equal(images(pipe, prompt), want)
    assert len(calls) == len(PROMPTS) * 3 * len(swapped)  # 3 steps, CFG's two halves in one batch


@pytest.mark.parametrize("self_tokens", [16, 8])
def test_short_self_attentions_run_the_operator_and_make_diffusers_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, self_tokens: int
) -> None:
    """With ``self_tokens`` the self-attentions are swapped too: those over that many tokens or fewer (the tiny SDXL's
    all run over 16 at 64 px) go through the operator, longer ones through diffusers' own forward; either way the
    images stay diffusers'. The tags say how many were swapped and where the kernel runs."""
    expected = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    wanted = images(expected, PROMPTS[0])
    pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    accelerator = build_accelerator(TEXT_ATTENTION | {"self_tokens": self_tokens})
    accelerator.check(CPU)
    accelerator.apply(pipe, target(tmp_path))
    crosses = cross_attentions(pipe.unet)
    selves = [module for module in pipe.unet.modules() if isinstance(module, Attention) and module not in crosses]
    assert selves and all(getattr(module, "named_like", "") == "text_attention_self" for module in selves)
    assert all(type(module).__name__ == "Attention" for module in selves)
    assert accelerator.tags() == {
        "text_attention": str(len(crosses)),
        "text_attention_self": f"{len(selves)} self-attentions, where over {self_tokens} tokens or fewer",
    }
    shapes = []

    def counted(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
        shapes.append(key.shape[1])
        return text_attention_reference(query, key, value, heads)

    monkeypatch.setattr("runner.accelerators.text_attention.text_attention_reference", counted)
    np.testing.assert_array_equal(images(pipe, PROMPTS[0]), wanted)
    short = len(selves) if self_tokens >= 16 else 0  # the tiny SDXL's self-attentions: 16 tokens each
    assert sorted(shapes) == sorted([*[16] * short, *[77] * len(crosses)] * 3)  # 3 steps


def test_self_tokens_out_of_the_kernels_reach_is_refused_in_one_line() -> None:
    for tokens in (-1, 512):
        with pytest.raises(ConfigError) as refused:
            build_accelerator(TEXT_ATTENTION | {"self_tokens": tokens}).check(CPU)
        assert "\n" not in str(refused.value) and f"accelerator.self_tokens={tokens}" in str(refused.value)
        assert "256" in str(refused.value)


def test_one_tile_holds_a_text_or_a_short_latent_but_no_more() -> None:
    """77 or 256 tokens of 64 channels a head, 128 of 128, a few of few; not 257 or 512 tokens, nor 77 of 160
    channels (instruct-pix2pix's widest heads), nor 256 of 128."""
    from runner.accelerators.text_attention import holds

    assert holds(77, 64) and holds(256, 64) and holds(128, 128) and holds(5, 16)
    assert not holds(257, 64) and not holds(512, 32) and not holds(77, 160) and not holds(256, 128)


def test_beside_fused_projections_compiled_precompiled_and_text_kv(tmp_path: Path) -> None:
    """Its forwards read ``to_kv`` (the self-attentions' ``to_qkv``) where torch_compile fused the projections, and
    text_kv's filled buffers; compiled (a whole graph) and loaded from the saved functions in a second pass, the
    images stay diffusers'."""
    expected = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
    wanted = [images(expected, prompt) for prompt in PROMPTS]
    for _ in range(2):  # cold, then from the saved functions
        torch._dynamo.reset()
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, torch.float32)
        chain = Chain(parts=[TEXT_ATTENTION | {"self_tokens": 16}, PRECOMPILED_ON_CPU, TEXT_KV])
        chain.check(CPU)
        chain.apply(pipe, target(tmp_path))
        for prompt, want in zip(PROMPTS, wanted, strict=True):
            np.testing.assert_allclose(images(pipe, prompt), want, atol=1e-5)
        attentions = [module for module in pipe.unet.module.modules() if isinstance(module, Attention)]
        assert all(module.fused_projections for module in attentions)
        assert {module.named_like for module in attentions} == {"text_attention", "text_attention_self"}
    assert chain.tags()["precompile_cache"] == "hit"


@pytest.mark.parametrize(
    "other",
    [
        {"_target_": "runner.accelerators.bf16.Bf16Accelerator"},
        {
            "_target_": "runner.accelerators.float8.Float8Accelerator",
            "include": ["ff.", "attn1.to_qkv", "attn2.to_q"],
            "fuse_qkv": True,
        },
    ],
    ids=["cg_bf16_text_attention", "fp8_text_attention"],
)
def test_beside_bfloat16_or_float8_the_images_are_those_of_the_part_without_it(tmp_path: Path, other: dict) -> None:
    """The variants that put it into compile_graph_bf16 and fp8_compile: after the whole pipeline's conversion to
    bfloat16, or before float8 fuses the projections and converts them (its forwards then call the float8 layers),
    the images on the CPU are those of that part alone; and its modules were swapped."""
    text = TEXT_ATTENTION | {"self_tokens": 16}
    with_it = Chain(parts=[text, other] if other["_target_"].endswith("Float8Accelerator") else [other, text])
    results = []
    dtype = torch.float16 if other["_target_"].endswith("Bf16Accelerator") else torch.float32  # bf16 converts fp16
    for chain in (build_accelerator(other), with_it):
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", CPU, dtype)
        chain.check(CPU)
        chain.apply(pipe, target(tmp_path, CPU, dtype))
        results.append(images(pipe, PROMPTS[0]))
    np.testing.assert_allclose(results[1], results[0], atol=1e-6)
    assert {getattr(module, "named_like", "") for module in pipe.unet.modules() if isinstance(module, Attention)} == {
        "text_attention",
        "text_attention_self",
    }


def test_the_operator_traces_and_a_mask_runs_diffusers_forward() -> None:
    """Its fake kernel gives torch.compile the output's shape (a whole graph holds it); a call with a mask, which the
    kernel does not take, runs diffusers' own forward."""
    query, text = torch.randn(2, 6, 8), torch.randn(2, 5, 16)
    key, value = text.chunk(2, dim=-1)  # strided, as to_kv's halves are
    torch.library.opcheck(text_attention, (query, key, value, 2))
    layer = Attention(8, cross_attention_dim=16, heads=2, dim_head=4)
    hidden = torch.randn(2, 6, 8)
    mask = torch.zeros(2, 1, 5)
    mask[:, :, 3:] = -10000.0  # the last two tokens masked out: a forward that dropped the mask would read them
    with torch.no_grad():
        plain, masked = layer(hidden, text), layer(hidden, text, mask)
        assert not torch.allclose(plain, masked)  # so the comparison below can tell the two apart
        build_accelerator(TEXT_ATTENTION).apply(types.SimpleNamespace(unet=layer), target(Path(".")))
        compiled = torch.compile(layer, fullgraph=True)
        torch.testing.assert_close(compiled(hidden, text), plain)
        torch.testing.assert_close(layer(hidden, text, mask), masked)


def test_refused_where_no_cross_attention_runs_the_default_processor() -> None:
    """A denoiser with no cross-attention, or only ones with a normalisation of their own or heads wider than the
    kernel holds, is refused in one line that names the fix."""
    normed = Attention(8, cross_attention_dim=16, heads=2, dim_head=4, cross_attention_norm="layer_norm")
    wide = Attention(320, cross_attention_dim=16, heads=2, dim_head=160)
    for unet in (torch.nn.Linear(2, 2), normed, wide):
        with pytest.raises(ConfigError) as refused:
            build_accelerator(TEXT_ATTENTION).apply(types.SimpleNamespace(unet=unet), target(Path(".")))
        assert "\n" not in str(refused.value) and str(refused.value).endswith("accelerator=compile_graph")


def test_the_kernel_computes_the_attention_in_tritons_interpreter() -> None:
    """The Triton kernel, each configuration, run by Triton's interpreter on the CPU (a process of its own: the
    interpreter is chosen when Triton's functions are made) at SDXL's head width, a narrower one and a few tokens:
    within float16's rounding of float32 arithmetic. Skipped where Triton is not installed, as on this project's CPU
    machines."""
    pytest.importorskip("triton")
    script = textwrap.dedent(
        """
        import torch
        from runner.accelerators.text_attention import text_attention_reference
        from runner.accelerators.text_attention_kernel import CONFIGS, launch
        torch.manual_seed(0)
        shapes = [(2, 100, 4, 64, 77), (3, 37, 8, 40, 77), (1, 64, 2, 16, 5), (1, 256, 2, 64, 256)]
        for images, queries, heads, head_dim, tokens in shapes:
            query = torch.randn(images, queries, heads * head_dim).half()
            key, value = torch.randn(images, tokens, 2 * heads * head_dim).half().chunk(2, dim=-1)
            exact = text_attention_reference(query.float(), key.float(), value.float(), heads)
            for block_m, warps in CONFIGS:
                out = torch.full_like(query, float("nan"))
                launch(query, key, value, out, heads, block_m, warps)
                assert (out.float() - exact).abs().max().item() < 2e-3, (images, queries, heads, block_m)
        print("ok")
        """
    )
    environment = os.environ | {"TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_every_configuration_builds_for_hopper_without_spilling(dtype: str) -> None:
    """Triton's compiler builds each configuration for sm_90 at SDXL's widths (77 tokens, 64 channels a head), in an
    SM's shared memory, no register spilled (what text_attention_kernel.CONFIGS says); at 256 tokens (the innermost
    self-attentions at 512 px) the operator's configuration spills, as measured, and 8 warps a tile do not. Skipped
    without Triton."""
    pytest.importorskip("triton")
    from hopper_build import HOPPER_SHARED_MEMORY, compile_for_hopper, spilled_bytes

    from runner.accelerators.text_attention_kernel import CONFIGS, blocks, text_attention_kernel

    signature = dict.fromkeys(["q", "k", "v", "out"], f"*{dtype}") | {"scale_log2": "fp32"}
    signature |= dict.fromkeys([name for name in text_attention_kernel.arg_names if name not in signature], "i32")

    def spilled(tokens: int, block_m: int, warps: int) -> int:
        block_t, block_d = blocks(tokens, 64)
        constants = {"BLOCK_M": block_m, "BLOCK_T": block_t, "BLOCK_D": block_d}
        binary, report = compile_for_hopper(text_attention_kernel, signature, constants, {"num_warps": warps})
        assert binary.metadata.shared <= HOPPER_SHARED_MEMORY, (tokens, block_m, warps)
        return spilled_bytes(report)

    assert [spilled(77, block_m, warps) for block_m, warps in CONFIGS] == [0] * len(CONFIGS)
    assert spilled(256, *CONFIGS[0]) > 0 and spilled(256, 64, 8) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(2, 4096, 10, 64, 77), (2, 1024, 20, 64, 77), (3, 1000, 8, 40, 77), (1, 37, 5, 160, 9), (2, 256, 20, 64, 256)],
)
def test_the_kernel_computes_torchs_attention_up_to_rounding(dtype: torch.dtype, shape: tuple) -> None:
    """SDXL's shapes (its text; its innermost self-attention at 512 px), instruct-pix2pix's narrower heads and ragged
    ones, every configuration and the operator: no further from float32 arithmetic than torch's own attention in
    ``dtype``, give or take a rounding."""
    from runner.accelerators.text_attention_kernel import CONFIGS, launch  # imports Triton

    images, queries, heads, head_dim, tokens = shape
    torch.manual_seed(0)
    query = torch.randn(images, queries, heads * head_dim, device="cuda", dtype=dtype)
    key, value = torch.randn(images, tokens, 2 * heads * head_dim, device="cuda", dtype=dtype).chunk(2, dim=-1)
    exact = text_attention_reference(query.float(), key.float(), value.float(), heads)
    torchs = (text_attention_reference(query, key, value, heads).float() - exact).abs().max().item()
    allowed = 2 * torchs + exact.abs().max().item() / 256
    for block_m, warps in CONFIGS:
        out = torch.full_like(query, float("nan"))
        launch(query, key, value, out, heads, block_m, warps)
        assert (out.float() - exact).abs().max().item() <= allowed, (block_m, warps)
    assert (text_attention(query, key, value, heads).float() - exact).abs().max().item() <= allowed


@pytest.mark.gpu
def test_the_unet_with_the_kernel_compiles_and_captures_on_a_gpu(tmp_path: Path) -> None:
    """The operator inside a compiled UNet captured as a CUDA graph, for the cross-attentions and the self-attentions
    (the tiny SDXL's run over 16 tokens at 64 px): its images stay those of diffusers' UNet compiled and captured the
    same way, up to rounding."""
    cuda = torch.device("cuda")
    parts = [
        {"_target_": "runner.accelerators.torch_compile.TorchCompileAccelerator", "compile_vae": False},
        {"_target_": "runner.accelerators.cuda_graph.CudaGraphAccelerator"},
    ]
    results = []
    for chain in (Chain(parts=parts), Chain(parts=[TEXT_ATTENTION | {"self_tokens": 16}, *parts])):
        pipe = build_pipeline(load_model("tiny_sdxl"), "t2i", cuda, torch.float16)
        chain.check(cuda)
        chain.apply(pipe, target(tmp_path, cuda, torch.float16))
        images(pipe, PROMPTS[0], cuda)  # the warmup: compiles, autotunes, captures
        results.append(images(pipe, PROMPTS[0], cuda))
    np.testing.assert_allclose(results[1], results[0], atol=2e-2)
