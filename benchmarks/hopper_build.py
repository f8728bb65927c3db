"""Triton's compiler, not its interpreter, building the GEGLU kernels for an H100 (sm_90) on a machine without a
GPU, and what NVIDIA's assembler (ptxas, the one Triton ships) says of each build: its registers, spills and
warnings such as C7515, tensor-core instructions serialised. Needs Triton, which this project's CPU machines have
not (pip install --target DIR triton==3.6.0, then PYTHONPATH=DIR); the tests that use it skip without it, and
benchmarks/ptxas_report.py tabulates it."""

import re
import subprocess
import tempfile
from typing import Any

HOPPER_SHARED_MEMORY = 232_448  # bytes a block may use on an H100 or H200 (227 KiB)
HOPPER = 90
PROGRAMS = 132  # an H100's SMs, one persistent program each (a compile-time constant of the tma kernels)


def compile_for_hopper(
    kernel: Any, signature: dict[str, str], constants: dict[str, Any], options: dict[str, int]
) -> tuple[Any, str]:
    """``kernel`` built for sm_90 with ``signature`` (its arguments' types, in any order) and ``constants`` (its
    constexpr arguments' values), and ptxas's verbose report of it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    signature = signature | dict.fromkeys(constants, "constexpr")
    ordered = {name: signature[name] for name in kernel.arg_names}
    constexprs = {(kernel.arg_names.index(name),): value for name, value in constants.items()}
    binary = triton.compile(
        ASTSource(kernel, ordered, constexprs), target=GPUTarget("cuda", HOPPER, 32), options=options
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(binary.asm["ptx"])
        ptx.flush()
        command = [get_ptxas(HOPPER).path, "-v", "--gpu-name=sm_90a", ptx.name, "-o", "/dev/null"]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    return binary, report


def serialised(report: str) -> bool:
    """Whether ptxas serialised a kernel's tensor-core (wgmma) instructions, which then wait for each other."""
    return "wgmma.mma_async instructions are serialized" in report


def registers(report: str) -> int:
    """The registers each thread of the kernel uses, as ptxas reports them."""
    return int(re.search(r"Used (\d+) registers", report)[1])


def spilled_bytes(report: str) -> int:
    """Bytes the kernel's threads spill to local memory (stores and loads), as ptxas reports them."""
    return sum(int(found) for found in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))


def injected_waits(report: str) -> int:
    """How many waits for the tensor cores ptxas added where registers they write are read (its C7517)."""
    return report.count("warpgroup.wait is injected")


def tma_build(dtype: str, meta: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The fp16 (or bf16) tma kernel's argument types, constants and Triton's options for one configuration
    (``geglu_kernels.settings``)."""
    meta = dict(meta)
    options = {"num_stages": meta.pop("num_stages"), "num_warps": meta.pop("num_warps")}
    m, n, k = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    shapes = {"x": [m, k], "hidden_w": [n, k], "gate_w": [n, k], "out": [m, n]}
    signature = {name: f"tensordesc<{dtype}[{a},{b}]>" for name, (a, b) in shapes.items()}
    signature |= {"b": f"*{dtype}"} | dict.fromkeys(["M", "N", "K"], "i32")
    constants = {"HAS_BIAS": True, "PROGRAMS": PROGRAMS, "WARP_SPECIALIZE": False, "FLATTEN": True} | meta
    return signature, constants, options


def float8_build(fast: bool, meta: dict[str, Any]) -> tuple[dict, dict, dict]:
    """The float8 kernel's argument types, constants and Triton's options for one configuration."""
    signature, constants, options = tma_build("fp8e4nv", meta)
    signature |= {"b": "*fp16", "scale": "*fp32", "inverse": "*fp32"}
    return signature, constants | {"FAST": fast}, options
