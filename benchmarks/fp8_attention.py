"""SDXL's attention timed alone on the GPU: torch's scaled_dot_product_attention in fp16 (its default backend on
our H100 and H200 is cuDNN's), cuDNN's own fp16 attention through its graph API, and cuDNN's float8 attention
(``sdpa_fp8``: Q, K and V in e4m3, with their descales) writing its output in e4m3 or in fp16: what float8
attention can give, the one other part of ``fp8_compile`` still in 16-bit besides the convolutions (about 140 ms
of a 1024 px call on an H200). Last, the fp16-out kernel with its cost in front: Q, K and V come out of fp16
products (fuse_qkv's, whose float8 lost: BENCHMARKS.md, "Float8 on the fused Q, K, V product"), so each call
would first cast them to e4m3, one compiled kernel reading them and writing a half of their bytes. A variant
cuDNN refuses is recorded with its message.

Q, K and V are laid out as diffusers makes them (each projection's (batch, tokens, heads x 64) viewed as (batch,
heads, tokens, 64)); the counts are SDXL's: per step, 10 transformer blocks at the 64x64 level of a 1024 px
latent (10 heads) and 60 at the 32x32 level (20 heads), each a self-attention and a cross-attention to the 77
text tokens; a 512 px latent has the same at a quarter of the tokens.

    python3 benchmarks/fp8_attention.py OUT.json [RES ...]      # default sizes: 1024 512
"""

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from kernel_timing import attempt, device_info, milliseconds, shape_line

from runner.accelerators.float8_conv import handle

STEPS, HEAD, TEXT = 30, 64, 77
FLOAT8 = torch.float8_e4m3fn


def attention_shapes(res: int) -> list[tuple[int, int, int, int]]:
    """(heads, query tokens, key tokens, how many a step runs) of SDXL's attention at ``res`` px."""
    wide, narrow = (res // 16) ** 2, (res // 32) ** 2  # the 64x64 and 32x32 levels of a 1024 px latent
    return [(10, wide, wide, 10), (10, wide, TEXT, 10), (20, narrow, narrow, 60), (20, narrow, TEXT, 60)]


def heads_view(tokens: int, heads: int, dtype: torch.dtype) -> torch.Tensor:
    """(2, heads, tokens, 64) as diffusers views a projection's output (2, tokens, heads x 64)."""
    return torch.randn(2, tokens, heads * HEAD, device="cuda").to(dtype).view(2, tokens, heads, HEAD).transpose(1, 2)


def cudnn_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype
) -> Callable[[], torch.Tensor]:
    """A function running cuDNN's attention (float8 if ``q`` is) into an output of ``out_dtype``, returning it."""
    import cudnn

    float8 = q.dtype == FLOAT8
    kinds = {torch.float16: cudnn.data_type.HALF, FLOAT8: cudnn.data_type.FP8_E4M3}
    graph = cudnn.pygraph(
        io_data_type=cudnn.data_type.HALF,
        intermediate_data_type=cudnn.data_type.FLOAT,
        compute_data_type=cudnn.data_type.FLOAT,
        handle=handle(q.device),
    )
    tensors = {
        name: graph.tensor(name=name, dim=list(x.shape), stride=list(x.stride()), data_type=kinds[x.dtype])
        for name, x in (("q", q), ("k", k), ("v", v))
    }
    feeds = {tensors[name]: x for name, x in (("q", q), ("k", k), ("v", v))}
    out = torch.empty(q.shape[0], q.shape[2], q.shape[1], HEAD, device="cuda", dtype=out_dtype).transpose(1, 2)
    if float8:
        one, scalar = torch.ones(1, 1, 1, 1, device="cuda"), {"dim": [1, 1, 1, 1], "stride": [1, 1, 1, 1]}
        scalars = {}
        for name in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o"):
            scalars[name] = graph.tensor(name=name, data_type=cudnn.data_type.FLOAT, **scalar)
            feeds[scalars[name]] = one
        o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=tensors["q"], k=tensors["k"], v=tensors["v"], is_inference=True, attn_scale=HEAD**-0.5, **scalars
        )
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim(scalar["dim"]).set_stride(scalar["stride"]).set_data_type(
                cudnn.data_type.FLOAT
            )
            feeds[amax] = torch.empty(1, 1, 1, 1, device="cuda")
    else:
        o, _ = graph.sdpa(q=tensors["q"], k=tensors["k"], v=tensors["v"], is_inference=True, attn_scale=HEAD**-0.5)
    o.set_output(True).set_dim(list(out.shape)).set_stride(list(out.stride())).set_data_type(kinds[out_dtype])
    feeds[o] = out
    graph.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    workspace = torch.empty(graph.get_workspace_size(), device="cuda", dtype=torch.uint8)
    cuda_handle = handle(q.device)

    def run() -> torch.Tensor:
        cudnn.set_stream(handle=cuda_handle, stream=torch.cuda.current_stream().cuda_stream)
        graph.execute(feeds, workspace, handle=cuda_handle)
        return out

    return run


def time_shape(heads: int, queries: int, keys: int) -> dict[str, dict]:
    q, k, v = (heads_view(tokens, heads, torch.float16) for tokens in (queries, keys, keys))
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    results = {"torch_fp16": {"ms": milliseconds(lambda: F.scaled_dot_product_attention(q, k, v))}}
    float8 = [x.to(FLOAT8) for x in (q, k, v)]  # values ~N(0, 1): e4m3 holds them with no scale
    for variant, operands, out_dtype in (
        ("cudnn_fp16", (q, k, v), torch.float16),
        ("fp8_out_fp8", float8, FLOAT8),
        ("fp8_out_fp16", float8, torch.float16),
    ):
        results[variant] = attempt(partial(cudnn_attention, *operands, out_dtype), expected)
    results["fp8_out_fp16_cast_first"] = attempt(partial(cast_first, (q, k, v), float8), expected)
    return results


def cast_into(sources: tuple[torch.Tensor, ...], targets: list[torch.Tensor]) -> None:
    for source, target in zip(sources, targets, strict=True):
        target.copy_(source)


def cast_first(operands: tuple[torch.Tensor, ...], float8: list[torch.Tensor]) -> Callable[[], torch.Tensor]:
    """cuDNN's float8 attention (fp16 out) preceded, each call, by the cast of the fp16 ``operands`` into the
    float8 buffers it reads (``float8``), as inductor would compile it."""
    attention = cudnn_attention(*float8, torch.float16)
    cast = torch.compile(cast_into)

    def run() -> torch.Tensor:
        cast(operands, float8)
        return attention()

    return run


def main(path: str, sizes: list[int]) -> None:
    torch.manual_seed(0)
    report: dict = {"device": device_info(), "sizes": {}}
    for res in sizes:
        rows, totals = [], {}
        for heads, queries, keys, count in attention_shapes(res):
            times = time_shape(heads, queries, keys)
            rows.append({"heads": heads, "queries": queries, "keys": keys, "count": count, "variants": times})
            for variant, result in times.items():
                totals[variant] = totals.get(variant, 0.0) + STEPS * count * result.get("ms", float("nan"))
            print(shape_line(f"{res} px, {heads} heads, {queries} x {keys} tokens, x{count}", times), flush=True)
        report["sizes"][res] = {"shapes": rows, "call_ms": totals}
        print(f"{res} px, {STEPS} steps' attention (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in totals.items()))
    Path(path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], [int(res) for res in sys.argv[2:]] or [1024, 512])
