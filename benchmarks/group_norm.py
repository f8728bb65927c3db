"""SDXL's resnet entries (a group norm, SiLU, the 3x3 convolution after them) compiled by inductor in channels_last, as
compile_graph_fast runs them, with torch's group norm and with group_norm's (runner/accelerators/group_norm.py: the
norm computed in its input's layout), at 1024 px: the UNet's up blocks' entries (CFG's batch of 2, float16), whose input
is the concatenation of the block's tensor and a skip connection; a plain UNet entry, whose input is a convolution's
output; and the VAE decoder's widest ones (one image, bfloat16, as compile_graph_fast's VAE). Each way compiled alone
and replayed from one CUDA graph of 4 entries with inputs of their own, so what inductor makes of the norm's layout
shows as the entry's time; the largest difference between the two ways beside. Prints one line per entry and writes
them as JSON.

    python3 benchmarks/group_norm.py OUT.json
"""

import json
import sys

import torch
import torch.nn.functional as F
from replay import captured, device_record, replayed_us  # this folder, first on the path of a script run from it

from runner.accelerators.group_norm import swap_group_norms

CALLS = 4
# (what, latent side, the block's channels, the skip connection's (0: no concatenation), the convolution's out, images,
# dtype), at 1024 px: the UNet's up blocks' resnets whose norms ran at 470-720 GB/s in a compile_graph_fast profile
# (BENCHMARKS.md, "Group norms across layouts"), a plain resnet's second norm, and the VAE decoder's last two blocks.
ENTRIES = [
    ("unet up_blocks.2 resnet 0", 128, 640, 320, 320, 2, torch.float16),
    ("unet up_blocks.2 resnet 1", 128, 320, 320, 320, 2, torch.float16),
    ("unet up_blocks.1 resnet 0", 64, 1280, 640, 640, 2, torch.float16),
    ("unet up_blocks.0 resnet 0", 32, 1280, 1280, 1280, 2, torch.float16),
    ("unet down_blocks.0 resnet", 128, 320, 0, 320, 2, torch.float16),
    ("vae up_blocks.3 resnet", 1024, 128, 0, 128, 1, torch.bfloat16),
    ("vae up_blocks.2 resnet", 512, 256, 0, 256, 1, torch.bfloat16),
]


class Entry(torch.nn.Module):
    def __init__(self, channels: int, out: int) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(32, channels)
        self.conv = torch.nn.Conv2d(channels, out, 3, padding=1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        joined = x if skip is None else torch.cat([x, skip], dim=1)
        return self.conv(F.silu(self.norm(joined)))


def measure(side: int, channels: int, skip: int, out: int, images: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)

    def tensor(c: int) -> torch.Tensor:
        return torch.randn(images, c, side, side, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)

    inputs = [(tensor(channels), tensor(skip) if skip else None) for _ in range(CALLS)]
    entry = Entry(channels + skip, out).to("cuda", dtype).to(memory_format=torch.channels_last).eval()
    row = {"side_1024px": side, "channels": channels, "skip": skip, "out": out, "images": images, "dtype": str(dtype)}
    outputs = {}
    for way in ("torch", "in_layout"):
        if way == "in_layout":
            swap_group_norms(entry)
        torch._dynamo.reset()
        compiled = torch.compile(entry)
        row[f"{way}_us"] = replayed_us(captured(lambda: [compiled(x, s) for x, s in inputs]), CALLS)  # noqa: B023
        outputs[way] = compiled(*inputs[0])
    row["largest_difference"] = (outputs["torch"].float() - outputs["in_layout"].float()).abs().max().item()
    return row


def main(path: str) -> None:
    rows = []
    with torch.no_grad():
        for what, *entry in ENTRIES:
            row = {"what": what} | measure(*entry)
            rows.append(row)
            print(
                f"{what}, {row['channels']}+{row['skip']} -> {row['out']}: torch {row['torch_us']:.1f} us, in layout "
                f"{row['in_layout_us']:.1f} us, largest difference {row['largest_difference']:.2e}",
                flush=True,
            )
    with open(path, "w") as file:
        json.dump({"device": device_record(), "entries": rows}, file, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
