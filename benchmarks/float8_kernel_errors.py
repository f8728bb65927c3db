"""How far the float8 GEGLU kernel's output lies from the float32 arithmetic, in float8 steps (written when the GPU
test, tests/test_float8_geglu.py's "computes the operator's arithmetic", held it to those sums and failed):
per shape, accumulation and configuration, the share of values 0, 1, 2 and more steps off, and the worst ones
with what they were before quantisation and how much of their sums cancelled; and the same counts for cuBLAS's
float8 product (its output in float32, GELU and gating in float32), the float8 layers' own sums: the test now
asks every tile to be no less exact than those, and to give their values where it promotes its sums as cuBLAS does
(BENCHMARKS.md, "Float8's fused GEGLU on its first GPU", "Float8's fast accumulation and fused GEGLU in
fp8_compile"). On a GPU:
    python3 benchmarks/float8_kernel_errors.py OUT.json
"""

import json
import sys

import torch

from runner.accelerators.float8 import quantise, scale_of
from runner.accelerators.float8_geglu import float8_geglu_reference

SHAPES = [(8192, 640, 2560), (2048, 1280, 5120), (512, 1280, 5120), (208, 96, 80)]  # the GPU test's


def steps(got: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many e4m3 values lie between each pair (e4m3fn's bytes are sign and magnitude, magnitudes in order)."""

    def order(values: torch.Tensor) -> torch.Tensor:
        bits = values.view(torch.uint8).int()
        magnitude = bits & 0x7F
        return torch.where(bits & 0x80 != 0, -magnitude, magnitude)

    return (order(got) - order(expected)).abs()


def inputs(rows: int, width: int, inner: int) -> tuple:
    """Seeded float8 operands of a GEGLU product (tests/test_float8_geglu.py's GPU test's too): ``x``, the weight,
    the product's scale, the output's inverse scale (the largest result maps to 448) and a bias."""
    torch.manual_seed(0)
    x = torch.randn(rows, width, device="cuda")
    weight = torch.randn(2 * inner, width, device="cuda") / width**0.5
    x_scale, weight_scale = scale_of(x.abs().amax()), scale_of(weight.abs().amax())
    x8, weight8 = quantise(x, 1 / x_scale), quantise(weight, 1 / weight_scale)
    scale, bias = x_scale * weight_scale, (torch.randn(2 * inner, device="cuda") * 0.1).half()
    one = torch.tensor(1.0, device="cuda")
    inverse = 1 / scale_of(float8_geglu_reference(x8, weight8, scale, one, bias).float().abs().amax())
    return x8, weight8, scale, inverse, bias


def unquantised(x8, weight8, scale, inverse, bias) -> tuple[torch.Tensor, torch.Tensor]:
    """The gated value before its cast to float8, and the sum of its products' magnitudes (how much cancelled)."""
    product = (x8.float() @ weight8.float().t()) * scale + bias.float()
    hidden, gate = product.chunk(2, dim=-1)
    magnitudes = (x8.float().abs() @ weight8.float().abs().t()) * scale
    return hidden * torch.nn.functional.gelu(gate) * inverse, magnitudes.chunk(2, dim=-1)[0]


def counted(off: torch.Tensor) -> dict[str, int]:
    counts = {str(n): int((off == n).sum()) for n in range(3)}
    return counts | {"more": int((off > 2).sum())}


def main(path: str) -> None:
    from runner.accelerators.geglu_kernels import FLOAT8_CONFIGS, label, launch_float8, settings  # imports Triton

    results = []
    for shape in SHAPES:
        operands = inputs(*shape)
        expected = float8_geglu_reference(*operands)
        before, magnitudes = unquantised(*operands)
        for fast in (True, False):
            off = steps(float8_geglu_reference(*operands, fast), expected)
            result = {"shape": shape, "fast": fast, "config": "cuBLAS, float32 out", "counts": counted(off)}
            results.append(result)
            print(shape, "fast" if fast else "promoted", "cuBLAS, float32 out", result["counts"], flush=True)
            for config in FLOAT8_CONFIGS:
                out = torch.empty_like(expected)
                launch_float8(*operands, out, fast, **settings(*config))
                torch.cuda.synchronize()
                off = steps(out, expected)
                counts = counted(off)
                worst = off.flatten().topk(min(5, off.numel())).indices
                rows = []
                for index in worst.tolist():
                    at = divmod(index, expected.shape[1])
                    rows.append(
                        {
                            "at": at,
                            "steps": int(off[at]),
                            "got": out[at].float().item(),
                            "expected": expected[at].float().item(),
                            "before_cast": before[at].item(),
                            "hidden_sum_of_magnitudes": magnitudes[at].item(),
                        }
                    )
                nan = int(out.float().isnan().sum())
                result = {"shape": shape, "fast": fast, "config": label(*config), "counts": counts, "nan": nan}
                result["worst"] = rows
                results.append(result)
                print(shape, "fast" if fast else "promoted", label(*config), counts, f"NaN {nan}", rows[:2], flush=True)
    with open(path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, file)


if __name__ == "__main__":
    main(sys.argv[1])
