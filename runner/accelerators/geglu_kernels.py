"""fused_geglu's Triton kernels: ``hidden * gelu(gate)`` of ``x @ weight.T + bias`` in one pass, the weight's two
halves (``hidden``'s rows, then ``gate``'s) read where ``Linear`` keeps them.

Two ways to feed the tensor cores:

- ``pointers``: each program computes one output tile, loading its operands through pointers and ``tl.dot``
  (Triton pipelines the loads). Timed on an H200: 8-34% slower than cuBLAS's product and inductor's element-wise
  kernel together (BENCHMARKS.md, "the GEGLU in one kernel").
- ``tma``: persistent programs, one per SM, walk the output tiles; every operand tile is loaded by Hopper's tensor
  memory accelerator (TMA descriptors made on the host) and the result stored the same way, as cuBLAS's Hopper
  kernels do. Out-of-range rows and columns are zero-filled on load and dropped on store, so any shape whose rows
  are 16-byte aligned runs. Its loops nested (``LOOPS``; first timed as "warp-specialised", which Triton 3.6.0
  builds the same way), faster than the two passes at 1024 px's shapes (8.0% and 3.5%) and slower at 512 px's
  smaller one (BENCHMARKS.md, "the fused GEGLU's tma kernel on a GPU"; ``benchmarks/geglu_kernel.py`` times both
  kernels); 1.0-1.6% off a 1024 px ``compile_graph_fast`` call (BENCHMARKS.md, "the tma kernel beside
  compile_graph_fast").

- ``float8``: ``tma`` for float8's feed-forward (``runner/accelerators/float8_geglu.py``, fp8's ``fuse_geglu``): float8
  operands with calibrated scales, the product scaled in the epilogue, and the gated result quantised there with
  the output layer's input scale, so it is written in float8 for that layer to read.

This module imports Triton, which the CPU machine has not: ``fused_geglu`` and ``float8`` import it when a kernel
first runs.
"""

from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from runner.accelerators import float8
from runner.accelerators.fused_geglu import tma_fits

FLOAT8_MAX = tl.constexpr(float8.FLOAT8_MAX)  # e4m3's largest value, as the kernel reads a global

# The configurations each kernel's autotuner times on a shape's first call (BLOCK_M, BLOCK_N, BLOCK_K, num_stages,
# num_warps, loop; ``LOOPS`` says what each loop is): the wide tiles Hopper's tensor cores want for SDXL's products
# (2,048-8,192 rows at 1024 px), and narrower ones for fewer rows (512 px's 512-2,048). A tile of 128 x 256, 79-81
# TFLOP/s on an H200 (its two accumulators do not fit in registers), was dropped. The tma kernel's table is its two
# widest tiles nested: on an H100 (2026-12-05) nested tiles beat every flat one at all four of SDXL's shapes (34.9
# against 39.8 µs at best at 512 px's 2,048 rows, 118.3 against 131.9 at 1024 px's 8,192), the narrower ones nested
# with 4 warps lost to the widest at each (36.1 against 35.2 µs at 512 rows, their best case), and what the table
# held as "specialised", the same binary as nested (LOOPS), timed within 3.3% of it (the benchmark's own spread for one
# binary; BENCHMARKS.md, "float8's fused GEGLU on its first GPU"). Fewer configurations: fewer builds and timings
# in a cold warmup (not timed).
BLOCKS = [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 8)]
CONFIGS = {
    "pointers": [(*block, "flat") for block in [*BLOCKS, (64, 64, 64, 4, 4)]],
    "tma": [(*block, "nested") for block in BLOCKS[:2]],
}

# How a tma kernel walks its tiles and their depth (a pointers kernel computes one tile a program: "flat" only).
# "flat": both loops flattened into one, which Triton pipelines across tiles; for Hopper, ptxas then serialises every
# tma kernel's tensor-core instructions (its warning C7515: the accumulators, zeroed where a tile starts, are written
# by other instructions inside the pipeline; Triton 3.6 moves that zeroing out of the pipeline for Blackwell only).
# "nested": a loop over depth inside one over tiles, the pipeline filled anew for each tile; ptxas serialises none of
# the fp16 kernel's, nor of the float8 kernel's with fast accumulation (with promoted sums it waits for the tensor
# cores where it adds them up, by design, and serialises the 128 x 64 tile). "specialised": nested, and Triton asked
# to split the loop into loading, matrix and epilogue warps; Triton 3.6.0 (the GPU machine's, with torch 2.11) builds
# these kernels exactly as nested ones, the same PTX, so what BENCHMARKS.md measured as warp specialisation's gain
# over the flat tiles ("the fused GEGLU's tma kernel on a GPU") is the nested loop's. All checked for sm_90 on the CPU
# machine (tests/test_fused_geglu.py, tests/test_float8_geglu.py; benchmarks/ptxas_report.py tabulates it); timed
# on an H100, nested and "specialised" alike (benchmarks/geglu_kernel.py and float8_geglu_kernel.py).
LOOPS = {"flat": {}, "nested": {"FLATTEN": False}, "specialised": {"WARP_SPECIALIZE": True, "FLATTEN": False}}

# The float8 kernel's: as tma's, with 128 float8 values of depth per tile (the 128 bytes that 64 fp16 values are,
# the widest row TMA's swizzle reads), and 64 for the narrower depth, nested rather than flat (LOOPS), and none
# "specialised", which would build the same kernels again. On an H100 (benchmarks/float8_geglu_kernel.py, every block
# size both ways) nested beat flat by 6-16% at all four shapes with fast accumulation (fp8_fast_bf16_geglu's); with
# promoted sums flat won by 6% at 1024 px's shapes and tied at 512 px's: no accelerator or variant fuses without fast
# accumulation, so the table stays nested. Its first row was the fastest at every shape.
FLOAT8_BLOCKS = [(128, 128, 128, 3, 8), (128, 128, 128, 4, 8), (128, 64, 128, 4, 4), (64, 128, 128, 4, 4)]
FLOAT8_CONFIGS = [(*block, "nested") for block in [*FLOAT8_BLOCKS, (128, 128, 64, 4, 8)]]


def settings(m: int, n: int, k: int, stages: int, warps: int, loop: str) -> dict[str, Any]:
    """One of ``CONFIGS`` as the kernel's meta-parameters and Triton's options: what ``launch`` takes to fix it."""
    blocks = {"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}
    return blocks | {"num_stages": stages, "num_warps": warps} | LOOPS[loop]


def label(m: int, n: int, k: int, stages: int, warps: int, loop: str) -> str:
    """A configuration as benchmarks and tests name it, e.g. ``128x128x64 s3 w8 specialised``."""
    return f"{m}x{n}x{k} s{stages} w{warps} {loop}"


def launch(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, kernel: str = "pointers",
    **config: int,
) -> None:  # fmt: skip
    """Run ``kernel`` on 2-D ``x`` into ``out``; ``config`` (one of ``CONFIGS`` as ``settings`` gives it) fixes the
    configuration instead of the autotuner's choice (benchmarks/geglu_kernel.py)."""
    LAUNCHERS[kernel](x, weight, bias, out, **config)


def _launch_pointers(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, **config: int
) -> None:
    rows, depth = x.shape
    width = out.shape[1]
    tuned, plain = KERNELS["pointers"]

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (-(-rows // meta["BLOCK_M"]) * -(-width // meta["BLOCK_N"]),)

    (plain if config else tuned)[grid](
        x, weight, weight if bias is None else bias, out, rows, width, depth,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, **config,
    )  # fmt: skip


def _launch_tma(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor, **config: int
) -> None:
    # fused_geglu refuses weights it cannot address when applied and copies such inputs (its KERNELS["tma"].fits)
    constants = {"HAS_BIAS": bias is not None}
    tensors = (weight if bias is None else bias,)
    _launch_persistent(KERNELS["tma"], "tma", x, weight, tensors, out, constants, config, " or use the pointers kernel")


def launch_float8(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, inverse: torch.Tensor, bias: torch.Tensor | None,
    out: torch.Tensor, fast: bool, **config: int,
) -> None:  # fmt: skip
    """The float8 kernel on 2-D float8 ``x`` and ``weight`` into float8 ``out``: ``scale`` (0-d float32) turns
    the product into the layer's values, ``inverse`` (0-d float32) quantises the gated result; ``fast``
    accumulates as Hopper's tensor cores do natively (as cuBLAS's use_fast_accum), else each tile's depth is
    added to float32 sums of its own. ``config`` (one of ``FLOAT8_CONFIGS`` as ``settings`` gives it) fixes the
    configuration instead of the autotuner's choice. (float8's fuse_geglu leaves layers it cannot address unfused.)"""
    tensors = (scale if bias is None else bias, scale, inverse)
    constants = {"HAS_BIAS": bias is not None, "FAST": fast}
    _launch_persistent(FLOAT8_KERNEL, "float8", x, weight, tensors, out, constants, config)


def _launch_persistent(
    kernels: tuple, name: str, x: torch.Tensor, weight: torch.Tensor, tensors: tuple, out: torch.Tensor,
    constants: dict[str, Any], config: dict[str, int], otherwise: str = "",
) -> None:  # fmt: skip
    """A persistent TMA kernel (``kernels``: autotuned and as it is) on 2-D ``x`` and ``weight`` (its two halves)
    into ``out``, one program per SM; ``tensors`` are its arguments between the descriptors and the sizes;
    ``otherwise``, what else its refusal of tensors TMA cannot address suggests."""
    if not tma_fits(x, weight, out):
        raise ValueError(
            f"the {name} kernel cannot address these tensors (strides {x.stride()}, {weight.stride()}, "
            f"{out.stride()}; each row's start must be 16-byte aligned): copy them with .contiguous(){otherwise}"
        )
    rows, depth = x.shape
    width = out.shape[1]
    # Block shapes are placeholders until a configuration sets them (its pre_hook, or here for a fixed one).
    named = {"x": x, "hidden_w": weight[:width], "gate_w": weight[width:], "out": out}  # the kernels' names
    descriptors = {key: TensorDescriptor.from_tensor(tensor, [1, 1]) for key, tensor in named.items()}
    if config:
        set_block_shapes(descriptors | config)
    tuned, plain = kernels
    programs = _programs(x.device)

    def grid(meta: dict[str, Any]) -> tuple[int]:
        return (min(programs, -(-rows // meta["BLOCK_M"]) * -(-width // meta["BLOCK_N"])),)

    (plain if config else tuned)[grid](
        *descriptors.values(), *tensors, rows, width, depth, PROGRAMS=programs, **constants, **config
    )


def _programs(device: torch.device) -> int:
    """One persistent program per SM (4 where there is no GPU: Triton's interpreter, on the CPU)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def set_block_shapes(args: dict[str, Any]) -> None:
    """Give the TMA kernel's descriptors the block shapes of the configuration about to run."""
    m, n, k = args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"]
    args["x"].block_shape = [m, k]
    args["hidden_w"].block_shape = [n, k]
    args["gate_w"].block_shape = [n, k]
    args["out"].block_shape = [m, n]


@triton.jit
def gelu_gated(hidden, gate):
    return hidden * (0.5 * gate * (1.0 + tl.erf(gate * 0.7071067811865476)))


@triton.jit
def tile_of(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    # Tiles in groups of GROUP_M rows, so that tiles running together share the weight's columns in L2.
    group = tile // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % (GROUP_M * tiles_n)) % group_m, (tile % (GROUP_M * tiles_n)) // group_m


@triton.jit
def halves(
    x, hidden_w, gate_w, row, col, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROMOTE: tl.constexpr,
):  # fmt: skip
    # One output tile's two products over the whole depth, every operand tile loaded through its TMA descriptor.
    # PROMOTE (float8 only): add Hopper's float8 sums to float32 ones after each tile's depth, where Triton's own
    # choice on Hopper never does.
    hidden = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        a = x.load([row, k * BLOCK_K])
        if PROMOTE:
            hidden = tl.dot(a, hidden_w.load([col, k * BLOCK_K]).T, hidden, max_num_imprecise_acc=BLOCK_K)
            gate = tl.dot(a, gate_w.load([col, k * BLOCK_K]).T, gate, max_num_imprecise_acc=BLOCK_K)
        else:
            hidden = tl.dot(a, hidden_w.load([col, k * BLOCK_K]).T, hidden)
            gate = tl.dot(a, gate_w.load([col, k * BLOCK_K]).T, gate)
    return hidden, gate


@triton.jit
def biased(hidden, gate, b, col, N, BLOCK_N: tl.constexpr):
    # The bias's two halves added to a tile's two products, in float32.
    cols = col + tl.arange(0, BLOCK_N)
    hidden += tl.load(b + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    gate += tl.load(b + N + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    return hidden, gate


@triton.jit
def pointers_kernel(
    x, w, b, out, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = tile_of(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Out-of-range rows and columns read in-range ones (wrapped) and are never stored: no masks on loads.
    rows_in = tl.max_contiguous(tl.multiple_of(rows % M, BLOCK_M), BLOCK_M)
    cols_in = tl.max_contiguous(tl.multiple_of(cols % N, BLOCK_N), BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    x_at = x + rows_in[:, None] * stride_xm + ks[None, :] * stride_xk
    hidden_at = w + cols_in[None, :] * stride_wn + ks[:, None] * stride_wk  # the weight's first half,
    gate_at = hidden_at + N * stride_wn  # and its second
    hidden = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        left = K - k * BLOCK_K
        a = tl.load(x_at, mask=ks[None, :] < left, other=0.0)
        hidden = tl.dot(a, tl.load(hidden_at, mask=ks[:, None] < left, other=0.0), hidden)
        gate = tl.dot(a, tl.load(gate_at, mask=ks[:, None] < left, other=0.0), gate)
        x_at += BLOCK_K * stride_xk
        hidden_at += BLOCK_K * stride_wk
        gate_at += BLOCK_K * stride_wk
    if HAS_BIAS:
        hidden += tl.load(b + cols_in).to(tl.float32)[None, :]
        gate += tl.load(b + N + cols_in).to(tl.float32)[None, :]
    at = out + rows[:, None] * stride_om + cols[None, :] * stride_on
    tl.store(at, gelu_gated(hidden, gate).to(out.dtype.element_ty), mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def tma_kernel(
    x, hidden_w, gate_w, out, b, M, N, K, HAS_BIAS: tl.constexpr, PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr = False, FLATTEN: tl.constexpr = True,
):  # fmt: skip
    # WARP_SPECIALIZE: Triton splits the loop into loading, matrix and epilogue warps (on Hopper without FLATTEN).
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tiles = tiles_m * tiles_n
    # The range is written in the loop itself: Triton's compiler takes only a call there (its interpreter took a
    # name too, and the kernel did not compile on its first GPU).
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_of(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
        hidden, gate = halves(x, hidden_w, gate_w, row, col, K, BLOCK_M, BLOCK_N, BLOCK_K, False)
        if HAS_BIAS:
            hidden, gate = biased(hidden, gate, b, col, N, BLOCK_N)
        out.store([row, col], gelu_gated(hidden, gate).to(out.dtype))


@triton.jit
def float8_kernel(
    x, hidden_w, gate_w, out, b, scale, inverse, M, N, K, HAS_BIAS: tl.constexpr, FAST: tl.constexpr,
    PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, WARP_SPECIALIZE: tl.constexpr = False, FLATTEN: tl.constexpr = True,
):  # fmt: skip
    # tma_kernel's walk over the tiles; float8 operands, their scales and the output's quantisation in the epilogue.
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    tiles = tiles_m * tiles_n
    product_scale = tl.load(scale)
    out_inverse = tl.load(inverse)
    for tile in tl.range(tl.program_id(0), tiles, PROGRAMS, flatten=FLATTEN, warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = tile_of(tile, tiles_m, tiles_n, GROUP_M)
        row, col = pid_m * BLOCK_M, pid_n * BLOCK_N
        hidden, gate = halves(x, hidden_w, gate_w, row, col, K, BLOCK_M, BLOCK_N, BLOCK_K, not FAST)
        hidden *= product_scale
        gate *= product_scale
        if HAS_BIAS:
            hidden, gate = biased(hidden, gate, b, col, N, BLOCK_N)
        gated = gelu_gated(hidden, gate) * out_inverse
        out.store([row, col], tl.clamp(gated, -FLOAT8_MAX, FLOAT8_MAX).to(out.dtype))


def configs(table: list[tuple], **extra: Any) -> list:
    """The autotuner's configurations for a kernel's ``table`` (``CONFIGS``' or ``FLOAT8_CONFIGS``)."""
    tuned = []
    for config in table:
        meta = settings(*config)
        stages, warps = meta.pop("num_stages"), meta.pop("num_warps")
        tuned.append(triton.Config(meta, num_stages=stages, num_warps=warps, **extra))
    return tuned


LAUNCHERS = {"pointers": _launch_pointers, "tma": _launch_tma}  # fused_geglu.KERNELS's names (a test checks)
# Each kernel autotuned, and as it is (for given block sizes).
KERNELS = {
    "pointers": (triton.autotune(configs(CONFIGS["pointers"]), key=["M", "N", "K"])(pointers_kernel), pointers_kernel),
    "tma": (
        triton.autotune(configs(CONFIGS["tma"], pre_hook=set_block_shapes), key=["M", "N", "K"])(tma_kernel),
        tma_kernel,
    ),
}
FLOAT8_KERNEL = (
    triton.autotune(configs(FLOAT8_CONFIGS, pre_hook=set_block_shapes), key=["M", "N", "K", "FAST"])(float8_kernel),
    float8_kernel,
)
