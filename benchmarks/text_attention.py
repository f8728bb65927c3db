"""SDXL's cross-attentions over the text's 77 tokens, and its self-attentions over 256 latent tokens at 512 px's
innermost level (text_attention's self_tokens), timed on the GPU: torch's attention with its default backend
(which one, this script does not record; in the UNet's profiles on an H100, cuDNN's, a memset before each) against
text_attention's Triton kernel, as the operator runs it and in each of its configurations, at SDXL's two transformer
widths at 512 and 1024 px, CFG's batch of 2, float16 and bfloat16. Each way replayed from one CUDA graph of 20
attentions with inputs of their own; the largest difference from float32 arithmetic on the same operands beside
each. Prints one line per shape and writes them as JSON.

    python3 benchmarks/text_attention.py OUT.json
"""

import json
import sys

import torch
from replay import captured, replayed_us  # this folder, first on the path of a script run from it

from runner.accelerators.text_attention import text_attention, text_attention_reference
from runner.accelerators.text_attention_kernel import CONFIGS, launch

TEXT = 77
# At 256 tokens the operator's configuration spills registers and 8 warps a tile of 64 queries do not (built for
# sm_90: tests/test_text_attention.py); timed beside the others, untimed in a call.
UNSPILLED_AT_256 = (64, 8)
CALLS = 20
# (px, latent tokens at the attention's level, channels, heads, keys): SDXL's two transformer widths, over the text;
# last, a self-attention (its keys the latent's own tokens) where the kernel holds them.
SHAPES = [
    (1024, 4096, 640, 10, TEXT),
    (1024, 1024, 1280, 20, TEXT),
    (512, 1024, 640, 10, TEXT),
    (512, 256, 1280, 20, TEXT),
    (512, 256, 1280, 20, 256),
]


def microseconds(function) -> float:
    """Mean µs per attention of ``function`` (CALLS attentions) replayed from one CUDA graph."""
    return replayed_us(captured(function), CALLS)


def measure(px: int, tokens: int, channels: int, heads: int, keys: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    if keys == tokens:  # a self-attention: queries, keys and values the thirds of to_qkv's rows
        projected = [torch.randn(2, tokens, 3 * channels, device="cuda", dtype=dtype) for _ in range(CALLS)]
        queries, pairs = zip(*[(q, (k, v)) for q, k, v in (row.chunk(3, dim=-1) for row in projected)], strict=True)
    else:
        queries = [torch.randn(2, tokens, channels, device="cuda", dtype=dtype) for _ in range(CALLS)]
        texts = [torch.randn(2, keys, 2 * channels, device="cuda", dtype=dtype) for _ in range(CALLS)]  # as to_kv's
        pairs = [text.chunk(2, dim=-1) for text in texts]
    outs = [torch.empty_like(query) for query in queries]
    exact = text_attention_reference(queries[0].float(), *(t.float() for t in pairs[0]), heads)

    def error(out: torch.Tensor) -> float:
        return (out.float() - exact).abs().max().item()

    row = {"px": px, "tokens": tokens, "channels": channels, "heads": heads, "keys": keys, "dtype": str(dtype)}
    with torch.no_grad():
        row["torch_us"] = microseconds(
            lambda: [text_attention_reference(q, k, v, heads) for q, (k, v) in zip(queries, pairs, strict=True)]
        )
        row["torch_error"] = error(text_attention_reference(queries[0], *pairs[0], heads))
        row["kernel_us"] = microseconds(
            lambda: [text_attention(q, k, v, heads) for q, (k, v) in zip(queries, pairs, strict=True)]
        )
        row["kernel_error"] = error(text_attention(queries[0], *pairs[0], heads))
        for block_m, warps in [*CONFIGS, UNSPILLED_AT_256]:

            def fixed(block_m=block_m, warps=warps):
                for q, (k, v), out in zip(queries, pairs, outs, strict=True):
                    launch(q, k, v, out, heads, block_m, warps)

            row[f"kernel_{block_m}_w{warps}_us"] = microseconds(fixed)
    return row


def main(path: str) -> None:
    rows = []
    for dtype in (torch.float16, torch.bfloat16):
        for shape in SHAPES:
            rows.append(measure(*shape, dtype))
            print(json.dumps(rows[-1]), flush=True)
    device = {"name": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    with open(path, "w") as file:
        json.dump({"device": device, "rows": rows}, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
