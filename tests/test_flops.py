"""Counting a denoiser step's FLOPs: a repeated block runs once per structure and input shape, and the total is
what running every block gives."""

import torch
from test_pipelines import meta_component, sdxl_step_inputs
from torch.utils.flop_counter import FlopCounterMode

from runner.flops import _count_flops, reuse_repeated_blocks


class Block(torch.nn.Module):
    def __init__(self, width: int, out: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Toy(torch.nn.Module):
    _repeated_blocks = ("Block",)

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.wide = Block(8, 8), Block(8, 8), Block(8, 8), Block(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b(self.a(x))  # the same structure and shape: b reuses a's count
        x = self.c(x[:2])  # the same structure, another shape: counted
        return self.wide(x)  # c's shape, another structure: counted


def flops(model: torch.nn.Module, *args, reuse: bool, **kwargs) -> tuple[int, int]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        reused = reuse_repeated_blocks(model, counter) if reuse else None
        model(*args, **kwargs)
    return counter.get_total_flops() + (reused.flops if reused else 0), reused.blocks if reused else 0


def test_a_block_is_reused_only_with_the_same_structure_and_input_shapes() -> None:
    with torch.device("meta"):
        x = torch.empty(4, 8)
        assert flops(Toy(), x, reuse=False) == (2 * (2 * 4 * 8 * 8) + 2 * 2 * 8 * 8 + 2 * 2 * 8 * 16, 0)
        assert flops(Toy(), x, reuse=True) == (flops(Toy(), x, reuse=False)[0], 1)


def test_sdxl_counted_with_reused_blocks_gives_every_block_s_total() -> None:
    """SDXL's 70 transformer blocks come in two shapes at 512 px: 68 reuse a count, the total is unchanged."""
    unet = meta_component("sdxl", "unet").to(torch.float16)
    args, kwargs = sdxl_step_inputs(512)
    every_block, _ = flops(unet, *args, reuse=False, **kwargs)
    assert flops(meta_component("sdxl", "unet").to(torch.float16), *args, reuse=True, **kwargs) == (every_block, 68)
    assert _count_flops(unet, (args, kwargs)) == every_block


class Outer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = Block(8, 8), Block(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class Nested(torch.nn.Module):
    _repeated_blocks = ("Outer", "Block")

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = Outer(), Outer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def test_a_reused_block_counts_what_blocks_inside_it_reused() -> None:
    with torch.device("meta"):
        x = torch.empty(4, 8)
        # a.first counted, a.second reuses it, b reuses a: four products, three of them reused
        assert flops(Nested(), x, reuse=True) == (flops(Nested(), x, reuse=False)[0], 2)
