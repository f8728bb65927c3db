"""What NVIDIA's assembler says of every build of the GEGLU kernels for an H100, on a machine without a GPU:

    PYTHONPATH=DIR python3 benchmarks/ptxas_report.py OUT.md     # DIR: pip install --target DIR triton==3.6.0

For the fp16 tma kernel (every tile in every loop, its autotuner's configurations marked) and the float8 kernel (its
configurations, and its nested tiles flat), with fast and promoted accumulation: each build's registers per thread,
spilled bytes, shared memory, whether ptxas serialised its tensor-core instructions (warning C7515 and its kin: each
then waits for the one before) and how many waits for them it injected (C7517); and whether a warp-specialised build
is its nested twin's PTX. A static reading, not a timing:
benchmarks/geglu_kernel.py and float8_geglu_kernel.py time the same builds on a GPU.
"""

import sys

import triton
from hopper_build import (
    compile_for_hopper,
    float8_build,
    injected_waits,
    registers,
    serialised,
    spilled_bytes,
    tma_build,
)

from runner.accelerators.geglu_kernels import (
    BLOCKS,
    CONFIGS,
    FLOAT8_CONFIGS,
    LOOPS,
    float8_kernel,
    label,
    settings,
    tma_kernel,
)


def other_loop(configs: list[tuple], swap: dict[str, str]) -> list[tuple]:
    """``configs`` whose loop ``swap`` names, with the other loop."""
    return [(*config[:-1], swap[config[-1]]) for config in configs if config[-1] in swap]


def main(path: str) -> None:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).version
    lines = [
        f"Triton {triton.__version__}, ptxas {ptxas}, target sm_90a (H100, H200).",
        "",
        "| kernel | accumulation | configuration | in its table | registers | spilled (B) | shared memory (B) | "
        "serialised | injected waits |",
        "|---|---|---|---|---:|---:|---:|---|---:|",
    ]
    builds = [("tma fp16", "", config, True, lambda meta: tma_build("fp16", meta)) for config in CONFIGS["tma"]]
    builds += [
        ("tma fp16", "", config, False, lambda meta: tma_build("fp16", meta))
        for config in [(*block, loop) for block in BLOCKS for loop in LOOPS if (*block, loop) not in CONFIGS["tma"]]
        if config[-1] != "specialised" or config[4] == 8  # Triton's Hopper pass refuses to specialise 4 warps
    ]
    for fast in (True, False):
        accumulation = "fast" if fast else "promoted"
        builds += [
            ("float8", accumulation, config, listed, lambda meta, fast=fast: float8_build(fast, meta))
            for configs, listed in ((FLOAT8_CONFIGS, True), (other_loop(FLOAT8_CONFIGS, {"nested": "flat"}), False))
            for config in configs
        ]
    ptx = {}
    for name, accumulation, config, listed, build in builds:
        kernel = tma_kernel if name.startswith("tma") else float8_kernel
        binary, report = compile_for_hopper(kernel, *build(settings(*config)))
        ptx[name, accumulation, config] = binary.asm["ptx"]
        row = (
            f"| {name} | {accumulation or '-'} | {label(*config)} | {'yes' if listed else 'no'} | "
            f"{registers(report)} | {spilled_bytes(report)} | {binary.metadata.shared} | "
            f"{'yes' if serialised(report) else 'no'} | {injected_waits(report)} |"
        )
        print(row, flush=True)
        lines.append(row)
    lines.append("")
    for (name, accumulation, config), code in ptx.items():
        twin = ptx.get((name, accumulation, (*config[:-1], "nested")))
        if config[-1] == "specialised" and twin is not None:
            same = "the same PTX as" if code == twin else "other PTX than"
            lines.append(f"{name} {label(*config)}: {same} its nested twin.")
    print("\n".join(lines[-2:]))
    with open(path, "w") as file:
        file.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
