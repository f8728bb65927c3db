"""Which of SDXL's matrix products and attentions the libraries precede with a small memset, and whether a torch
setting or another attention backend drops it, each op timed inside a CUDA graph as the runner replays them.

A kernel profile of `compile_graph_fast` at 1024 px on an H200 (BENCHMARKS.md, "the text's keys once") holds
7,034 memsets of 4 bytes in one call: one before each cuDNN attention and one before each of the feed-forward's
first products, each a kernel boundary of its own inside the graph. This asks, op by op, at 1024 px's shapes
(batch 2 for guidance), where they come from and what removing them would save.

    python benchmarks/memsets.py OUT.json           # the products and attentions
    python benchmarks/memsets.py OUT.json nodes     # what a memset node costs between two kernels, and the rest

A later profile ("the fused GEGLU in compile_graph_fast") put about 5 µs of idle GPU around each of those
memsets against 0.5 µs between two kernels. ``nodes`` asks what would take that away, before anything rewrites
the runner's graphs: the same product replayed with nothing after it, with a 4-byte memset after it (as cuDNN
issues one), with a kernel writing those 4 bytes instead (what a rewritten graph could hold), and with the
memset on a second stream beside the product (off the path from one kernel to the next). Its answer on an H200
(BENCHMARKS.md, "the VAE's encoder compiled"): each of the three adds about 2 µs a product, so no rewrite pays.
"""

import ctypes
import json
import statistics
import sys

import torch
import torch.nn.functional as F
from replay import captured  # this folder, first on the path of a script run from it
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

REPEATS = 20  # ops per captured graph: one replay's time over this is an op's
# (tokens, in, out, bias): SDXL's transformer blocks at 1024 px, 640 wide at 64x64 and 1280 wide at 32x32.
PRODUCTS = [
    (8192, 640, 5120, True),  # feed-forward's GEGLU projection
    (8192, 2560, 640, True),  # feed-forward's output
    (8192, 640, 1920, False),  # fused Q, K, V
    (8192, 640, 640, True),  # attention's output
    (2048, 1280, 10240, True),
    (2048, 5120, 1280, True),
    (2048, 1280, 3840, False),
    (2048, 1280, 1280, True),
]
# (batch, heads, queries, keys): self-attention and cross-attention (77 text tokens) at both widths.
ATTENTIONS = [(2, 10, 4096, 4096), (2, 10, 4096, 77), (2, 20, 1024, 1024), (2, 20, 1024, 77)]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}


def graphed(op) -> torch.cuda.CUDAGraph:
    """``op`` REPEATS times in one CUDA graph (replay.captured)."""
    return captured(lambda: [op() for _ in range(REPEATS)])


def measure(op) -> dict:
    graph = graphed(op)
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / REPEATS)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    memsets = sum("memset" in e.name.lower() for e in kernels)
    names = sorted({e.name[:70] for e in kernels if "memset" not in e.name.lower()})
    return {"us": round(statistics.median(times), 2), "memsets_per_op": memsets / REPEATS, "kernels": names}


def products(setting: str) -> list[dict]:
    rows = []
    for tokens, width_in, width_out, bias in PRODUCTS:
        x = torch.randn(tokens, width_in, device="cuda", dtype=torch.float16)
        w = torch.randn(width_out, width_in, device="cuda", dtype=torch.float16) / width_in**0.5
        b = torch.randn(width_out, device="cuda", dtype=torch.float16) if bias else None
        row = measure(lambda x=x, w=w, b=b: F.linear(x, w, b))
        row.update(op="linear", shape=[tokens, width_in, width_out, bias], setting=setting)
        row["tflops"] = round(2 * tokens * width_in * width_out / row["us"] / 1e6, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def attentions() -> list[dict]:
    rows = []
    for batch, heads, queries, keys in ATTENTIONS:
        q = torch.randn(batch, heads, queries, 64, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(batch, heads, keys, 64, device="cuda", dtype=torch.float16) for _ in range(2))
        for name, backend in BACKENDS.items():
            with sdpa_kernel(backend):
                try:
                    row = measure(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
                except RuntimeError as error:
                    row = {"error": str(error).splitlines()[0][:200]}
            row.update(op="attention", shape=[batch, heads, queries, keys], setting=name)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def between_kernels() -> list[dict]:
    """One product (2,048 x 1,280 x 1,280: a cross-attention's size at 1024 px) replayed ``REPEATS`` times in a
    graph with each thing in ``between`` after it; a thing's cost is its graph's time a product less the bare one's."""
    driver = ctypes.CDLL("libcuda.so.1")
    driver.cuMemsetD32Async.argtypes = [ctypes.c_uint64, ctypes.c_uint, ctypes.c_size_t, ctypes.c_void_p]
    x = torch.randn(2048, 1280, device="cuda", dtype=torch.float16)
    w = torch.randn(1280, 1280, device="cuda", dtype=torch.float16) / 1280**0.5
    word = torch.ones(1, device="cuda", dtype=torch.int32)
    side = torch.cuda.Stream()

    def memset() -> None:  # a memset node, as cudaMemsetAsync puts one in a graph
        stream = torch.cuda.current_stream().cuda_stream
        if driver.cuMemsetD32Async(word.data_ptr(), 0, 1, stream) != 0:
            raise RuntimeError("cuMemsetD32Async failed")

    def memset_beside() -> None:  # forked onto a second stream before the product, joined after it
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            memset()
        F.linear(x, w)
        torch.cuda.current_stream().wait_stream(side)

    between = {
        "nothing": lambda: F.linear(x, w),
        "a 4-byte memset": lambda: (F.linear(x, w), memset()),
        "a kernel writing 4 bytes": lambda: (F.linear(x, w), word.zero_()),
        "a 4-byte memset beside the product": memset_beside,
    }
    rows = []
    for name, op in between.items():
        row = measure(op) | {"op": "product, then", "setting": name}
        rows.append(row)
    for row in rows:
        row["us_more_than_nothing"] = round(row["us"] - rows[0]["us"], 2)
        print(json.dumps(row), flush=True)
    return rows


def settings_and_backends() -> list[dict]:
    rows = products("default")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    rows += products("no fp16 reduced-precision reduction")
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = True
    torch.backends.cuda.preferred_blas_library("cublaslt")
    rows += products("cublaslt preferred")
    torch.backends.cuda.preferred_blas_library("cublas")
    return rows + attentions()


def main(out: str, part: str = "") -> None:
    rows = between_kernels() if part == "nodes" else settings_and_backends()
    versions = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), **versions, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
