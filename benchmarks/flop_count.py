"""How long the runner's FLOP count of SDXL's UNet takes, with its repeated blocks counted once (runner/flops.py)
and with every block run, in this process (CPU work only: the count runs on the meta device).

    python benchmarks/flop_count.py [ROUNDS]
"""

import json
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from runner.flops import _count_flops

UNET = Path(__file__).resolve().parent.parent / "runner/architectures/sdxl/unet"


def step_inputs(res: int) -> tuple[tuple, dict]:
    meta = {"dtype": torch.float16, "device": "meta"}
    latent = res // 8
    return (torch.empty(2, 4, latent, latent, **meta), torch.empty((), device="meta")), {
        "encoder_hidden_states": torch.empty(2, 77, 2048, **meta),
        "added_cond_kwargs": {"text_embeds": torch.empty(2, 1280, **meta), "time_ids": torch.empty(2, 6, **meta)},
    }


def every_block(unet: torch.nn.Module, inputs: tuple[tuple, dict]) -> float:
    with torch.device("meta"):
        copy = type(unet).from_config(unet.config).to(torch.float16)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        copy(*inputs[0], **inputs[1])
    return float(counter.get_total_flops())


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(UNET)).to(torch.float16)
    for res in (512, 1024):
        for name, count in (("every block", every_block), ("repeated blocks once", _count_flops)):
            for _ in range(rounds):
                start = time.perf_counter()
                flops = count(unet, step_inputs(res))
                row = {"res": res, "count": name, "s": round(time.perf_counter() - start, 3), "tflop": flops / 1e12}
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
