"""SDXL's cross-attention with the text's keys and values fixed for a call, timed on the GPU two ways: as diffusers
computes it (the query's product, attention over the 77 text tokens, the output's product), and folded: the query's
weight multiplied into the keys once per call (each head's ``W_q,h^T K_h^T / sqrt(d)``, C x 77) and the values into
the output's weight (``V_h W_o,h``, 77 x C), so a step runs one product to the scores of every head, a softmax over
each head's 77, and one product back to C channels, with no attention kernel and no square products. The same
arithmetic in another order: equal up to rounding.

Each way is compiled by torch.compile and replayed from one CUDA graph holding 20 blocks with weights of their own
(as a UNet's consecutive blocks, so no block finds the last one's weights in L2), at SDXL's two transformer widths
at 512 and 1024 px, CFG's batch of 2; the folded way with its scores in the dtype and in float32. Errors (eager,
scores of standard deviation 1 and 4) are against diffusers' arithmetic in float64 on the same rounded operands.
Prints one line per shape and writes them as JSON.

Measured on an H100 (BENCHMARKS.md, "the cross-attention folded", 2026-12-05): folded took 2.1-3.2 times as long
at every shape, so no accelerator folds.

    python3 benchmarks/folded_attention.py OUT.json
"""

import json
import sys

import torch
import torch.nn.functional as F
from replay import captured, replayed_us  # this folder, first on the path of a script run from it

TEXT = 77
BLOCKS = 20
# (px, tokens of the latent at the attention's level, channels, heads): SDXL's two transformer widths.
SHAPES = [(1024, 4096, 640, 10), (1024, 1024, 1280, 20), (512, 1024, 640, 10), (512, 256, 1280, 20)]


def diffusers_way(x, wq, k, v, wo, bo, heads):
    batch, tokens, channels = x.shape
    d = channels // heads
    q = F.linear(x, wq).view(batch, tokens, heads, d).transpose(1, 2)
    k = k.view(batch, TEXT, heads, d).transpose(1, 2)
    v = v.view(batch, TEXT, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, channels)
    return F.linear(out, wo, bo)


def folded_way(x, mt, u, bo, heads, scores_dtype):
    batch, tokens, _ = x.shape
    if scores_dtype is None:
        scores = torch.bmm(x, mt.transpose(1, 2))
    else:
        scores = torch.bmm(x, mt.transpose(1, 2), out_dtype=scores_dtype)
    p = scores.view(batch, tokens, heads, TEXT).float().softmax(-1).to(x.dtype).view(batch, tokens, heads * TEXT)
    return torch.baddbmm(bo, p, u)


def folded(wq, k, v, wo, heads):
    """(Mt, U): Mt (batch, heads x 77, C) = each head's K_h W_q,h / sqrt(d), U (batch, heads x 77, C) = V_h W_o,h^T,
    computed in float32 and rounded once."""
    batch = k.shape[0]
    channels = wq.shape[0]
    d = channels // heads
    kh = k.float().view(batch, TEXT, heads, d).transpose(1, 2)  # (b, h, 77, d)
    vh = v.float().view(batch, TEXT, heads, d).transpose(1, 2)
    mt = (kh @ wq.float().view(heads, d, channels)) / d**0.5  # (b, h, 77, C)
    u = vh @ wo.float().t().reshape(heads, d, channels)  # (b, h, 77, C)
    return mt.reshape(batch, heads * TEXT, channels).to(wq.dtype), u.reshape(batch, heads * TEXT, channels).to(wq.dtype)


def graphed(function, *args) -> torch.cuda.CUDAGraph:
    """``function`` compiled, warmed up and captured in one CUDA graph."""
    compiled = torch.compile(function, fullgraph=True)
    return captured(lambda: compiled(*args))


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def operands(tokens, channels, heads, dtype, score_std, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, device="cuda", generator=g) * std).to(dtype)

    x, k, v = randn(2, tokens, channels), randn(2, TEXT, channels, std=score_std), randn(2, TEXT, channels)
    wq, wo = randn(channels, channels, std=channels**-0.5), randn(channels, channels, std=channels**-0.5)
    return x, wq, k, v, wo, randn(channels, std=0.1)


def errors(tokens, channels, heads, dtype, score_std):
    """Each way's relative error against float64 arithmetic on the same rounded operands, eager."""
    x, wq, k, v, wo, bo = operands(tokens, channels, heads, dtype, score_std, seed=1)
    reference = diffusers_way(*(t.double() for t in (x, wq, k, v, wo, bo)), heads)
    mt, u = folded(wq, k, v, wo, heads)
    ways = {
        "diffusers": lambda: diffusers_way(x, wq, k, v, wo, bo, heads),
        "folded": lambda: folded_way(x, mt, u, bo, heads, None),
        "folded_f32_scores": lambda: folded_way(x, mt, u, bo, heads, torch.float32),
    }
    found = {}
    for name, way in ways.items():
        try:
            found[name] = relative_error(way(), reference)
        except Exception as error:
            found[name] = f"{type(error).__name__}: {str(error)[:200]}"
    return found


def measure(px, tokens, channels, heads, dtype):
    blocks = [operands(tokens, channels, heads, dtype, 1.0, seed=i) for i in range(BLOCKS)]
    mtu = [folded(wq, k, v, wo, heads) for x, wq, k, v, wo, bo in blocks]

    def blocks_diffusers(*_):
        return [diffusers_way(*operands_, heads) for operands_ in blocks]

    def blocks_folded(scores_dtype):
        return lambda *_: [folded_way(b[0], *mtu[i], b[5], heads, scores_dtype) for i, b in enumerate(blocks)]

    row = {"px": px, "tokens": tokens, "channels": channels, "heads": heads, "dtype": str(dtype)}
    with torch.no_grad():
        for score_std in (1.0, 4.0):
            row[f"errors_score_std_{score_std:g}"] = errors(tokens, channels, heads, dtype, score_std)
        for name, function in (
            ("diffusers", blocks_diffusers),
            ("folded", blocks_folded(None)),
            ("folded_f32_scores", blocks_folded(torch.float32)),
        ):
            try:
                row[name + "_us"] = replayed_us(graphed(function), BLOCKS)
            except Exception as error:  # one way failing (bmm's out_dtype under compile, say) is a result too
                row[name + "_failed"] = f"{type(error).__name__}: {str(error)[:300]}"
            torch.compiler.reset()
    return row


def main(path: str) -> None:
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for px, tokens, channels, heads in SHAPES:
            row = measure(px, tokens, channels, heads, dtype)
            rows.append(row)
            print(json.dumps(row), flush=True)
    device = {"name": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    with open(path, "w") as file:
        json.dump({"device": device, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
