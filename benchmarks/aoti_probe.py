"""Which AOTInductor package settings load on this GPU: a small fp16 module (convolution, group norm, linear,
attention) exported, compiled to a package with each setting, then loaded and run in a fresh process.

    python benchmarks/aoti_probe.py OUT_FOLDER

Written after aot_graph's worker died by SIGSEGV inside ``aoti_load_package`` on an H100 (torch 2.11), where
the same code loads on the CPU (torch 2.13). Each step runs in its own process, so a crash names its setting
(the exit code) instead of ending the probe. Prints one line per setting and step.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SETTINGS = {
    "constants_outside_so": {"aot_inductor.package_constants_in_so": False},
    "constants_outside_so_caching_allocator": {
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.weight_use_caching_allocator": True,
    },
    "constants_in_so": {},
}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(64, 64, 3, padding=1)
        self.norm = torch.nn.GroupNorm(8, 64)
        self.qkv = torch.nn.Linear(64, 192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.conv(x))
        tokens = h.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + out.transpose(1, 2).reshape(x.shape)


def model_and_input() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Block().cuda().half().eval(), torch.randn(2, 64, 32, 32, device="cuda", dtype=torch.half)


def compile_one(folder: Path, name: str) -> None:
    import torch._inductor

    model, x = model_and_input()
    exported = torch.export.export(model, (x,), strict=False)
    torch._inductor.aoti_compile_and_package(
        exported, package_path=str(folder / f"{name}.pt2"), inductor_configs=SETTINGS[name]
    )


def load_one(folder: Path, name: str) -> None:
    import torch._inductor

    model, x = model_and_input()
    print(f"  {name}: loading", flush=True)
    loaded = torch._inductor.aoti_load_package(str(folder / f"{name}.pt2"))
    print(f"  {name}: loaded", flush=True)
    weights = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = loaded.get_constant_fqns()
    loaded.load_constants({n: weights[n] for n in names}, check_full_update=True, user_managed=True)
    with torch.no_grad():
        error = (loaded(x) - model(x)).abs().max().item()
    print(f"  {name}: max abs difference to eager {error:.2e}", flush=True)


def main() -> None:
    folder = Path(sys.argv[1])
    if len(sys.argv) == 4:  # one step of one setting, in its own process
        {"compile": compile_one, "load": load_one}[sys.argv[2]](folder, sys.argv[3])
        return
    folder.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__}
    for name in SETTINGS:
        for step in ("compile", "load"):
            began = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, str(folder), step, name], timeout=240)
            outcome = "ok" if done.returncode == 0 else f"exit {done.returncode}"
            results[f"{name}/{step}"] = outcome
            print(f"{name} {step}: {outcome} in {time.perf_counter() - began:.1f} s", flush=True)
            if done.returncode:
                break
    (folder / "aoti_probe.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
