"""text_attention's Triton kernel: attention over a short text (SDXL's 77 tokens) in one pass per tile of queries.

Each program takes ``BLOCK_M`` queries of one head of one image and the whole of that head's keys and values (the
text's tokens padded to ``BLOCK_T``, the padding masked out of the softmax), so there is no loop over keys and no
running maximum: one product to the scores, their softmax in float32, one product to the output, each row divided
by its sum, as flash attention's kernels do for one block of keys. Queries, keys, values and the output are read and
written where diffusers' projections keep them (rows of ``heads x head_dim`` channels, a head's channels side by
side), so nothing is transposed or copied around it. This module imports Triton, which the CPU machine has not:
``text_attention`` imports it when the kernel first runs.
"""

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634

# The configurations timed (BLOCK_M, num_warps); the first is the one the operator runs. On an H100 it was the
# faster at each of SDXL's eight shapes and dtypes (BENCHMARKS.md, "the cross-attention over the text in a kernel of
# its own"), so no autotuner times them in a warmup. Built for sm_90 by Triton 3.6.0 with 77 tokens and 64 channels a
# head (SDXL's), neither spills registers (241 and 208 a thread); 128 queries with 4 warps spilled 556 bytes and was
# left out (tests/test_text_attention.py builds them). At 256 tokens (self-attentions, text_attention's self_tokens)
# the first spills 248 bytes, and was measured so, faster than torch's attention there (BENCHMARKS.md,
# "`text_attention` in `compile_graph_fast`"); 64 queries with 8 warps build without spilling, not yet timed.
CONFIGS = [(64, 4), (128, 8)]


@triton.jit
def text_attention_kernel(
    q, k, v, out, N, T, H, D, scale_log2, stride_qb, stride_qn, stride_kb, stride_kt, stride_vb, stride_vt,
    stride_ob, stride_on, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    block, image_head = tl.program_id(0), tl.program_id(1)
    image, head = image_head // H, image_head % H
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = tl.arange(0, BLOCK_T)
    channels = tl.arange(0, BLOCK_D)
    in_head = channels[None, :] < D
    first = head * D  # the head's first channel in each row
    query_mask = (rows[:, None] < N) & in_head
    queries = tl.load(
        q + image * stride_qb + rows[:, None] * stride_qn + first + channels[None, :], mask=query_mask, other=0.0
    )
    text_mask = (tokens[:, None] < T) & in_head
    keys = tl.load(
        k + image * stride_kb + tokens[:, None] * stride_kt + first + channels[None, :], mask=text_mask, other=0.0
    )
    values = tl.load(
        v + image * stride_vb + tokens[:, None] * stride_vt + first + channels[None, :], mask=text_mask, other=0.0
    )
    scores = tl.dot(queries, tl.trans(keys)) * scale_log2  # log2-scaled, for exp2
    scores = tl.where(tokens[None, :] < T, scores, float("-inf"))
    weights = tl.exp2(scores - tl.max(scores, 1)[:, None])
    attended = tl.dot(weights.to(values.dtype), values) / tl.sum(weights, 1)[:, None]
    at = out + image * stride_ob + rows[:, None] * stride_on + first + channels[None, :]
    tl.store(at, attended.to(out.dtype.element_ty), mask=query_mask)


def blocks(text_tokens: int, head_dim: int) -> tuple[int, int]:
    """The text's and a head's widths as the kernel pads them (powers of two, 16 or more, as its products need)."""
    return max(16, triton.next_power_of_2(text_tokens)), max(16, triton.next_power_of_2(head_dim))


def launch(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, heads: int,
    block_m: int = CONFIGS[0][0], num_warps: int = CONFIGS[0][1],
) -> None:  # fmt: skip
    """Attention of ``query`` (images, queries, heads x head_dim) over ``key`` and ``value`` (images, tokens,
    heads x head_dim; each row's channels contiguous, rows strided as they come) into ``out``, shaped as
    ``query``, in tiles of ``block_m`` queries by ``num_warps`` warps."""
    images, queries, channels = query.shape
    tokens, head_dim = key.shape[1], channels // heads
    block_t, block_d = blocks(tokens, head_dim)
    text_attention_kernel[(triton.cdiv(queries, block_m), images * heads)](
        query, key, value, out, queries, tokens, heads, head_dim, head_dim**-0.5 * LOG2_E,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        out.stride(0), out.stride(1), BLOCK_M=block_m, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )  # fmt: skip
