"""What the kernel benchmarks (fp8_matmul.py, fp8_conv.py, fp8_attention.py) share: timing one kernel with CUDA
events, a variant timed or its refusal recorded, the device and libraries, one line per shape."""

import traceback
from collections.abc import Callable

import torch


def milliseconds(function: Callable[[], object], calls: int = 50) -> float:
    """Mean milliseconds of ``function`` over ``calls`` launched back to back, after 5 untimed."""
    for _ in range(5):
        function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def attempt(build: Callable[[], Callable[[], torch.Tensor]], expected: torch.Tensor) -> dict:
    """Build a variant and time it, with its relative error against ``expected``; or, where the library refuses
    to build or run it (cuDNN's graphs for a shape or dtype it has no kernel for), its message: the refusal is
    the measurement, so it is recorded, not dropped."""
    try:
        run = build()
        error = ((run().float() - expected).norm() / expected.norm()).item()
        return {"ms": milliseconds(run), "relative_error": error}
    except Exception as refused:
        traceback.print_exc(limit=2)
        return {"error": f"{type(refused).__name__}: {refused}"[:400]}


def device_info() -> dict[str, object]:
    """The GPU, torch, CUDA and cuDNN (torch's, and the one NVIDIA's Python API to cuDNN loaded, if it did)."""
    info: dict[str, object] = {
        "name": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn_torch": torch.backends.cudnn.version(),
    }  # fmt: skip
    try:
        import cudnn

        info |= {"cudnn_frontend": cudnn.__version__, "cudnn": cudnn.backend_version_string()}
    except Exception as missing:
        info["cudnn_frontend"] = f"{type(missing).__name__}: {missing}"
    return info


def shape_line(label: str, times: dict[str, dict]) -> str:
    return f"{label}: " + ", ".join(
        f"{variant} {result['ms'] * 1000:.1f} us" if "ms" in result else f"{variant} refused"
        for variant, result in times.items()
    )
