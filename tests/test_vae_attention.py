"""vae_attention: the VAE's attention as two matrix products and a softmax computes what diffusers' does, fused
projections or not; inductor keeps it so (its pattern matcher would make the plain form an SDPA call again);
torch_compile sets it after the fused projections; what it does not compute is refused in one line."""

from pathlib import Path

import pytest
import torch
from conftest import load_model
from diffusers.models.attention_processor import Attention
from torch._inductor.utils import run_and_get_code

from runner.accelerators import Target
from runner.accelerators.torch_compile import TorchCompileAccelerator
from runner.accelerators.vae_attention import MatmulVaeAttention, use_matmul_attention
from runner.config import ConfigError
from runner.pipelines import build_pipeline

CPU = torch.device("cpu")


def tiny_vae() -> torch.nn.Module:
    """The tiny SDXL's VAE: one single-head attention in the encoder's middle block, one in the decoder's."""
    return build_pipeline(load_model("tiny_sdxl"), "i2i", CPU, torch.float32).vae


def attention_blocks(vae: torch.nn.Module) -> list[Attention]:
    return [module for module in vae.modules() if isinstance(module, Attention)]


@pytest.mark.parametrize("fused", [False, True])
def test_the_matmul_attention_computes_what_diffusers_does(fused: bool) -> None:
    torch.manual_seed(0)
    vae = tiny_vae()
    if fused:
        vae.fuse_qkv_projections()  # to_qkv, and diffusers' fused processor
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected_latents = vae.encode(image).latent_dist.mean
        expected_image = vae.decode(expected_latents).sample
        assert use_matmul_attention(vae) == 2
        latents = vae.encode(image).latent_dist.mean
        decoded = vae.decode(expected_latents).sample
    assert all(isinstance(block.processor, MatmulVaeAttention) for block in attention_blocks(vae))
    torch.testing.assert_close(latents, expected_latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(decoded, expected_image, rtol=1e-4, atol=1e-5)


def test_inductor_compiles_it_as_two_products_not_an_attention_kernel() -> None:
    """Written as softmax(q @ k.T * scale) @ v, inductor replaces it by scaled_dot_product_attention: the scale
    on the queries first and the softmax in float32 keep the two products (checked on inductor's CPU code)."""
    torch._dynamo.reset()
    vae = tiny_vae().to(torch.bfloat16)
    block = vae.decoder.mid_block.attentions[0]
    block.set_processor(MatmulVaeAttention())
    hidden = torch.randn(1, block.to_q.in_features, 8, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        _, code = run_and_get_code(torch.compile(block), hidden)
    code = "\n".join(code)
    assert "scaled_dot_product" not in code and code.count("extern_kernels.bmm") == 2, code


def test_torch_compile_sets_it_after_the_fused_projections(tmp_path: Path) -> None:
    """diffusers' fuse_qkv_projections gives the VAE its own fused processor: set first, this one would be lost."""
    pipe = build_pipeline(load_model("tiny_sdxl"), "i2i", CPU, torch.float32)
    accelerator = TorchCompileAccelerator(backend="eager", cache=False, fuse_qkv=True, vae_attention="matmul")
    accelerator.apply(pipe, Target("unet", CPU, torch.float32, tmp_path, "tiny_sdxl-random-i2i-64x64-fp32"))
    blocks = attention_blocks(pipe.vae)
    assert blocks and all(isinstance(block.processor, MatmulVaeAttention) for block in blocks)
    assert all(block.fused_projections for block in blocks)
    assert not any(isinstance(block.processor, MatmulVaeAttention) for block in attention_blocks(pipe.unet))


def test_an_unknown_choice_or_a_vae_it_cannot_serve_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^accelerator.vae_attention=flash: choose one of sdpa, matmul$"):
        TorchCompileAccelerator(vae_attention="flash").check(CPU)
    with pytest.raises(ConfigError, match=r"^accelerator.vae_attention=matmul: the VAE \(Linear\) has no attention"):
        use_matmul_attention(torch.nn.Linear(2, 2))
    vae = tiny_vae()
    vae.decoder.mid_block.attentions[0].norm_q = torch.nn.LayerNorm(8)
    refusal = r"^accelerator.vae_attention=matmul: the VAE's decoder.mid_block.attentions.0 has query or key norms"
    with pytest.raises(ConfigError, match=refusal):
        use_matmul_attention(vae)
    assert not any(isinstance(block.processor, MatmulVaeAttention) for block in attention_blocks(vae))  # none set


@pytest.mark.gpu
def test_on_a_gpu_compiled_in_bfloat16_it_computes_what_the_attention_kernel_does() -> None:
    """An attention block as SDXL's VAE builds it (one head of 512 channels), in bfloat16 on a GPU, compiled by
    inductor with cuBLAS's products, against diffusers' processor (PyTorch's memory-efficient kernel, the only
    one taking that head): the same up to rounding the scores to bfloat16, which the kernel keeps in float32."""
    torch.manual_seed(0)
    block = Attention(
        query_dim=512,
        heads=1,
        dim_head=512,
        norm_num_groups=32,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    ).to("cuda", torch.bfloat16)
    hidden = torch.randn(1, 512, 32, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():  # the attention's part of the output, without the residual that carries the input
        expected = block(hidden).float() - hidden.float()
        block.set_processor(MatmulVaeAttention())
        got = torch.compile(block)(hidden).float() - hidden.float()
    assert ((got - expected).norm() / expected.norm()).item() < 2e-2
