"""Triton's compiler, not its interpreter, building a kernel for an H100 (sm_90) on a machine without a GPU, and
what NVIDIA's assembler says of the result. Triton is not installed on this project's CPU machines; tests that use
this skip there (pip install --target DIR triton==3.6.0, then PYTHONPATH=DIR)."""

import subprocess
import tempfile
from typing import Any

import pytest

HOPPER_SHARED_MEMORY = 232_448  # bytes a block may use on an H100 or H200 (227 KiB)
HOPPER = 90


def compile_for_hopper(
    kernel: Any, signature: dict[str, str], constants: dict[str, Any], options: dict[str, int]
) -> tuple[Any, str]:
    """``kernel`` built for sm_90 with ``signature`` (its arguments' types, in any order) and ``constants`` (its
    constexpr arguments' values), and ptxas's verbose report of it (its registers, spills and warnings such as
    C7515, tensor-core instructions serialised)."""
    triton = pytest.importorskip("triton")
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
