"""The cross-attention over the text in one Triton kernel of its own, where torch runs cuDNN's attention.

SDXL's 70 cross-attentions a step attend over the prompt's 77 tokens. cuDNN's attention, torch's choice for them on
Hopper, runs them in its general kernel (named for tiles of 64 queries by 128 keys), after a 4-byte memset each: on
an H100 at 1024 px they took 10.0 µs (32 x 32 latent, 2,048 queries of 20 heads) and 15.0 µs (64 x 64, 8,192 of 10
heads) each, 22.8 ms of a ``compile_graph_fast`` call (its profile, in
``benchmarks/results/2026-12-05-h100-folded-bf16/``), where reading the queries and writing the output at the GPU's
bandwidth takes 3.5 and 7 µs. Here one program takes a tile of queries of one head and all of that head's keys and
values at once (``text_attention_kernel.py``): no loop over keys, no memset. The arithmetic is flash attention's for
one block of keys (float32 scores and softmax, the weights rounded to the dtype for the second product), so the
images change by rounding only.

It replaces the ``forward`` of each cross-attention that diffusers' default processor would run (``Attention``
with its default processor, fused or not, no normalisation of its own, no mask, heads of at most 128 channels); any
call it does not cover (a mask, no text) runs diffusers' own. ``runner::text_attention`` is a custom operator, so
torch.compile keeps it as one call and a CUDA graph captures it; on a CPU, for other dtypes or shapes the kernel does
not take, it runs diffusers' arithmetic (``F.scaled_dot_product_attention``), which is what the CPU tests check the
swap against. Composes with ``text_kv``: the keys and values it reads are then the filled buffers.

With ``self_tokens`` the self-attentions over at most that many latent tokens go through the same kernel (their
queries, keys and values the thirds of the fused ``to_qkv``'s rows): SDXL's innermost ones at 512 px, 256 tokens,
60 of its 70 a step; none at 1024 px, whose innermost are 1,024.

Measured on an H100 (BENCHMARKS.md, "the cross-attention over the text in a kernel of its own", 2026-12-05): the
kernel took 15.7 and 9.8 µs at 1024 px's two shapes against torch's attention's (its default backend) 17.1 and 12.4,
6.5 and 5.4 at 512 px's against 10.0 and 7.6, the same largest difference from float32 arithmetic as torch's; at 256
tokens of self-attention 8.6 against 9.0 µs. In whole calls of ``compile_graph_fast``, both orders on each H100 start
("``text_attention`` in ``compile_graph_fast``", 2026-12-06): 6.6 and 8.3 ms less at 1024 px, 8.3 and 8.2 ms less at
512 px with the cross-attentions alone, and 4.1 and 4.8 ms less again with ``self_tokens: 256``, the images the same. So
``compile_graph_fast`` holds it, first, with ``self_tokens: 256``.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from runner.accelerators import Accelerator, Target, named_like, require_triton
from runner.config import ConfigError

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
# The kernel holds a head's keys and values whole, padded to powers of two: at most 16,384 of each (32 KiB in 16
# bits), as 128 tokens of 128 channels or 256 of 64 (SDXL's text: 77 tokens of 64 channels a head; its innermost
# self-attentions at 512 px: 256 latent tokens of 64; instruct-pix2pix's widest heads, 160 channels, run diffusers'
# attention), at most 128 channels a head and 256 tokens (a tile's scores over 256 tokens are 128 float32 registers
# a thread).
HELD = 128 * 128
WIDEST = 128
LONGEST = 256


def text_attention_reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Diffusers' arithmetic: each head's attention by ``F.scaled_dot_product_attention``, the heads side by side
    again in each row."""
    images, queries, channels = query.shape
    head_dim = channels // heads

    def by_head(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.reshape(images, -1, heads, head_dim).transpose(1, 2)

    attended = F.scaled_dot_product_attention(by_head(query), by_head(key), by_head(value))
    return attended.transpose(1, 2).reshape(images, queries, channels)


def kernel_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> bool:
    """Whether the Triton kernel runs this call: a GPU, float16 or bfloat16, keys and a head it holds in one tile,
    each row's channels contiguous."""
    return (
        query.device.type == "cuda"
        and query.dtype in KERNEL_DTYPES
        and key.dtype == value.dtype == query.dtype
        and holds(key.shape[1], query.shape[-1] // heads)
        and all(tensor.stride(-1) == 1 for tensor in (query, key, value))
    )


def holds(tokens: int, head_dim: int) -> bool:
    """Whether one tile of the kernel holds a head's keys and values: ``tokens`` of ``head_dim`` channels each."""

    def padded(width: int) -> int:  # as text_attention_kernel.blocks pads it, without importing Triton
        return max(16, 1 << (width - 1).bit_length())

    return head_dim <= WIDEST and tokens <= LONGEST and padded(tokens) * padded(head_dim) <= HELD


@torch.library.custom_op("runner::text_attention", mutates_args=())
def text_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of ``query`` (images, queries, channels) over a text's ``key`` and ``value`` (images, tokens,
    channels), ``heads`` heads side by side in the channels, as diffusers' processor computes it; one Triton kernel
    where ``kernel_takes`` it, diffusers' arithmetic elsewhere."""
    if not kernel_takes(query, key, value, heads):
        return text_attention_reference(query, key, value, heads)
    from runner.accelerators.text_attention_kernel import launch  # imports Triton: on a GPU only

    out = torch.empty(query.shape, device=query.device, dtype=query.dtype)
    launch(query, key, value, out, heads)
    return out


@text_attention.register_fake
def _(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    return query.new_empty(query.shape)


def text_forward(
    self: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Diffusers' default processor for a cross-attention without normalisation, its attention in
    ``runner::text_attention``; any call it does not cover runs diffusers' own forward."""
    if encoder_hidden_states is None or attention_mask is not None or hidden_states.ndim != 3:
        return Attention.forward(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    query = self.to_q(hidden_states)
    if getattr(self, "fused_projections", False):
        key, value = self.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        key, value = self.to_k(encoder_hidden_states), self.to_v(encoder_hidden_states)
    return projected_out(self, torch.ops.runner.text_attention(query, key, value, self.heads), hidden_states)


def self_forward(
    self: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Diffusers' default processor for a self-attention without normalisation over at most ``self.short_tokens``
    tokens, its attention in ``runner::text_attention``; any call it does not cover (more tokens, a mask, a context
    given) runs diffusers' own forward."""
    covered = hidden_states.ndim == 3 and hidden_states.shape[1] <= self.short_tokens
    if encoder_hidden_states is not None or attention_mask is not None or not covered:
        return Attention.forward(self, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
    if getattr(self, "fused_projections", False):
        query, key, value = self.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = self.to_q(hidden_states), self.to_k(hidden_states), self.to_v(hidden_states)
    return projected_out(self, torch.ops.runner.text_attention(query, key, value, self.heads), hidden_states)


def projected_out(self: Attention, attended: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
    """What diffusers' default processor does after the attention: the output projection (and its dropout), the
    residual where the module has one, the rescaling."""
    out = self.to_out[1](self.to_out[0](attended))
    if self.residual_connection:
        out = out + hidden_states
    return out / self.rescale_output_factor


def swappable(module: torch.nn.Module, cross: bool = True) -> bool:
    """Whether ``module`` is a cross-attention (a self-attention where not ``cross``) that diffusers' default
    processor runs with nothing of its own around the attention (no normalisation, its processor one of the
    defaults, fused or not), its heads no wider than the kernel holds (instruct-pix2pix's 160-channel ones stay
    torch's, which inductor compiles with the rest)."""
    return (
        isinstance(module, Attention)
        and module.is_cross_attention == cross
        and module.inner_dim // module.heads <= WIDEST
        and type(module.processor) in (AttnProcessor2_0, FusedAttnProcessor2_0)
        and all(
            getattr(module, name, None) is None
            for name in ("spatial_norm", "group_norm", "norm_q", "norm_k", "norm_cross")
        )
    )


@dataclass
class TextAttentionAccelerator(Accelerator):
    # Self-attentions over at most this many latent tokens run the same kernel (SDXL's innermost ones at 512 px: 256
    # tokens, 60 of its 70 a step); 0 leaves every self-attention to torch's attention. At most LONGEST (256), the
    # most the kernel holds; wider heads than 64 channels hold fewer (HELD), and run torch's attention inside the
    # operator.
    self_tokens: int = 0

    def check(self, device: torch.device) -> None:
        if not 0 <= self.self_tokens <= LONGEST:
            raise ConfigError(
                f"accelerator.self_tokens={self.self_tokens}: give a number of tokens from 0 (the self-attentions run "
                f"torch's attention) to {LONGEST}, the most the kernel holds"
            )
        if device.type != "cuda":
            return  # diffusers' arithmetic: nothing to import
        require_triton(
            "text_attention", "use an accelerator without TextAttentionAccelerator among its parts, e.g. compile_graph"
        )

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        modules = [module for module in denoiser.modules() if swappable(module)]
        if not modules:
            raise ConfigError(
                f"text_attention: {type(denoiser).__name__} has no cross-attention that diffusers' default processor "
                f"runs with heads of at most {WIDEST} channels; use an accelerator without TextAttentionAccelerator "
                "among its parts, e.g. accelerator=compile_graph"
            )
        for module in modules:
            module.__class__ = named_like(type(module), "text_attention", {"forward": text_forward})
        selves = [module for module in denoiser.modules() if self.self_tokens and swappable(module, cross=False)]
        for module in selves:
            module.__class__ = named_like(type(module), "text_attention_self", {"forward": self_forward})
            module.short_tokens = self.self_tokens
        self.swapped = len(modules), len(selves)  # state, not an option

    def tags(self) -> dict[str, str]:
        swapped = getattr(self, "swapped", None)
        if swapped is None:
            return {}
        tags = {"text_attention": str(swapped[0])}
        if self.self_tokens:
            tags["text_attention_self"] = f"{swapped[1]} self-attentions, where over {self.self_tokens} tokens or fewer"
        return tags
