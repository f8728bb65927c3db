"""The VAE's attention as two matrix products and a softmax, where PyTorch's attention kernels do poorly.

SDXL's VAE has one self-attention in the middle of its encoder and one in its decoder: a single head of
512 channels over every latent pixel (16,384 of them at 1024 px). cuDNN's and flash attention do not take a
head that wide, so ``scaled_dot_product_attention`` runs the memory-efficient kernel: on an H200,
``compile_graph_fast``'s 1024 px decode spent 3.9 ms in attention kernels (BENCHMARKS.md, "Image-to-image rows
of the other compiled accelerators"), about 140 TFLOP/s for its 550 GFLOP, where cuBLAS runs products of that
size several times faster. Written out, the scores are a product, the softmax one fused kernel, the output a
second product: 512 MiB of bfloat16 scores at 1024 px, made and read once.

The scale goes on the queries before their product with the keys, and the softmax is taken in float32 (as
diffusers asks of the VAE's attention, ``upcast_softmax``) and cast back: written as ``softmax(q @ k.T *
scale) @ v``, inductor's pattern matcher would turn it back into ``scaled_dot_product_attention``. The scores
themselves are rounded to the VAE's dtype by the first product, where the memory-efficient kernel keeps them
in float32, so the images change by rounding: the quality metrics say by how much.

torch_compile's option ``vae_attention: matmul`` sets it on the VAE after the fused projections (which set
their own processor), so that what is compiled and saved is this. Untimed on a GPU.
"""

import torch
from diffusers.models.attention_processor import Attention

from runner.config import ConfigError
from runner.errors import RunnerError


class MatmulVaeAttention:
    """A diffusers attention processor for the VAE's self-attention blocks (4-D input, no mask, no text),
    with the projections fused (``to_qkv``) or not."""

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise RunnerError("MatmulVaeAttention computes self-attention without a mask: it was given text or a mask")
        residual = hidden_states
        batch, channels, height, width = hidden_states.shape
        tokens = hidden_states.view(batch, channels, height * width)
        if attn.group_norm is not None:
            tokens = attn.group_norm(tokens)
        tokens = tokens.transpose(1, 2)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(tokens).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)
        query, key, value = (heads(tensor, attn.heads) for tensor in (query, key, value))
        scores = (query * attn.scale) @ key.transpose(-1, -2)
        weights = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)
        out = (weights @ value).transpose(1, 2).reshape(batch, height * width, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        out = out.transpose(1, 2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def heads(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """(batch, tokens, count * width) as (batch, count, tokens, width)."""
    batch, tokens, _ = tensor.shape
    return tensor.view(batch, tokens, count, -1).transpose(1, 2)


def use_matmul_attention(vae: torch.nn.Module) -> int:
    """Give the VAE's self-attention blocks ``MatmulVaeAttention``; return how many. Refuses, naming the block,
    what this processor does not compute: cross-attention, spatial or query/key norms, masks."""
    blocks = [(name, module) for name, module in vae.named_modules() if isinstance(module, Attention)]
    if not blocks:
        raise ConfigError(
            f"accelerator.vae_attention=matmul: the VAE ({type(vae).__name__}) has no attention block; "
            "set vae_attention: sdpa"
        )
    for name, block in blocks:
        unlike = [
            what
            for what, present in (
                ("cross-attention", block.is_cross_attention),
                ("a spatial norm", block.spatial_norm is not None),
                ("query or key norms", block.norm_q is not None or block.norm_k is not None),
            )
            if present
        ]
        if unlike:
            raise ConfigError(
                f"accelerator.vae_attention=matmul: the VAE's {name} has {', '.join(unlike)}, which the matmul "
                "attention does not compute; set vae_attention: sdpa"
            )
    for _, block in blocks:
        block.set_processor(MatmulVaeAttention())
    return len(blocks)
