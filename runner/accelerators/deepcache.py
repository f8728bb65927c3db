"""DeepCache (Ma et al., 2023): reuse the UNet's deep features across steps; lossy.

Adjacent denoising steps produce nearly the same high-level features. Every ``interval``-th step runs the
whole UNet and keeps the output of the first layer of its last up block (everything below it, the deep
part, is folded into that feature). The steps in between run only the shallow path: the time and text
embeddings, ``conv_in``, the first down block's early layers, then the last up block's remaining layers on
top of the kept feature, and the output convolutions. Which path runs is decided in Python per step, and
the two paths are separate modules (``step_modules``) with tensors in and tensors out, so torch_compile can
compile each on its own and cuda_graph can capture each in its own graph.

Written against diffusers' UNet2DConditionModel: the shallow path is the full forward restricted to the
outermost level, and a test checks that, given the feature of the same step, it reproduces the full
UNet's output exactly. Features it does not cover (ControlNet or adapter residuals, image-hint conditioning)
are refused.
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from runner.accelerators import Accelerator, DenoiserWrapper, Stage, Target, Wraps
from runner.catalogue import Metric
from runner.config import ConfigError

UNSUPPORTED = (
    "down_block_additional_residuals",
    "mid_block_additional_residual",
    "down_intrablock_additional_residuals",
    "class_labels",
)


class ShallowUNet(torch.nn.Module):
    """The UNet's outermost level alone, on top of a kept deep feature; shares the UNet's weights."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        feature: torch.Tensor,
        added_cond_kwargs: dict | None = None,
        timestep_cond: torch.Tensor | None = None,
        cross_attention_kwargs: dict | None = None,
        attention_mask: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        unet = self.unet
        if attention_mask is not None:  # as the full forward does: masks become additive biases
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if unet.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = unet.time_embedding(unet.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        aug = unet.get_aug_embed(
            emb=emb, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        emb = emb + aug if aug is not None else emb
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        context = unet.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs
        )
        attend = {
            "encoder_hidden_states": context,
            "cross_attention_kwargs": cross_attention_kwargs,
            "attention_mask": attention_mask,
            "encoder_attention_mask": encoder_attention_mask,
            "return_dict": False,
        }

        hidden = unet.conv_in(sample)
        skips = [hidden]
        down = unet.down_blocks[0]
        for layer in range(len(down.resnets) - 1):  # the last layer's output feeds the deep part only
            hidden = down.resnets[layer](hidden, emb)
            if getattr(down, "attentions", None):
                hidden = down.attentions[layer](hidden, **attend)[0]
            skips.append(hidden)

        up = unet.up_blocks[-1]
        hidden = feature
        for layer in range(1, len(up.resnets)):  # layer 0 produced the feature
            hidden = up.resnets[layer](torch.cat([hidden, skips.pop()], dim=1), emb)
            if getattr(up, "attentions", None):
                hidden = up.attentions[layer](hidden, **attend)[0]

        if unet.conv_norm_out is not None:
            hidden = unet.conv_act(unet.conv_norm_out(hidden))
        return unet.conv_out(hidden)


class FullUNet(torch.nn.Module):
    """The whole UNet, returning its output and the deep feature that the shallow steps reuse."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.kept: torch.Tensor | None = None
        up = unet.up_blocks[-1]
        first = up.attentions[0] if getattr(up, "attentions", None) else up.resnets[0]
        first.register_forward_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self.kept = output[0] if isinstance(output, tuple) else output

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.unet(*args, return_dict=False, **kwargs)[0]
        feature, self.kept = self.kept, None
        return out, feature


class DeepCacheUNet(DenoiserWrapper):
    """Runs the whole UNet every ``interval`` steps (keeping its deep feature) and the shallow path between."""

    step_modules = ("full", "shallow")  # what accelerators applied after this one compile or capture

    def __init__(self, unet: torch.nn.Module, interval: int) -> None:
        super().__init__(unet)
        self.full = FullUNet(unet)
        self.shallow = ShallowUNet(unet)
        self.interval = interval
        self.step = 0
        self.feature: torch.Tensor | None = None

    def reset(self) -> None:
        """A new pipeline call: its first step runs the whole UNet."""
        self.step = 0
        self.feature = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Any,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        full = self.step % self.interval == 0 or self.feature is None
        self.step += 1
        if full:
            out, self.feature = self.full(sample, timestep, encoder_hidden_states, *args, **kwargs)
        elif args or any(kwargs.get(name) is not None for name in UNSUPPORTED):
            raise ConfigError("accelerator=deepcache does not support ControlNet, adapters or class labels")
        else:
            out = self.shallow(sample, timestep, encoder_hidden_states, self.feature, **kwargs)
        return UNet2DConditionOutput(sample=out) if return_dict else (out,)


@dataclass
class DeepCacheAccelerator(Accelerator):
    interval: int = 3  # the whole UNet runs on steps 0, interval, 2 x interval, ...

    wraps: ClassVar[Wraps] = Wraps.DENOISER
    stage: ClassVar[Stage] = Stage.RESTRUCTURE
    catalogue: ClassVar[tuple[Metric, ...]] = (
        Metric("deepcache_full_step_share", "steps running the whole UNet", "", "{:.0%}"),
    )

    def check(self, device: torch.device) -> None:
        if self.interval < 1:
            raise ConfigError(f"accelerator.interval={self.interval}: must be at least 1 (1 caches nothing)")

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        unet = getattr(pipe, target.denoiser)
        if not (hasattr(unet, "up_blocks") and hasattr(unet, "down_blocks") and hasattr(unet, "get_aug_embed")):
            raise ConfigError(
                f"accelerator=deepcache needs a diffusers UNet as the denoiser, not {type(unet).__name__}"
            )
        if unet.config.addition_embed_type == "image_hint":
            raise ConfigError("accelerator=deepcache does not support image-hint conditioning")
        self.wrapped = DeepCacheUNet(unet, self.interval)
        setattr(pipe, target.denoiser, self.wrapped)
        scheduler = pipe.scheduler

        def reset_then_set_timesteps(*args: Any, **kwargs: Any) -> Any:  # called once per pipeline call
            self.wrapped.reset()
            # The class's, looked up at each call: a later part may change it (host_ahead does).
            return type(scheduler).set_timesteps(scheduler, *args, **kwargs)

        scheduler.set_timesteps = reset_then_set_timesteps

    def metrics(self) -> dict[str, float]:
        # achieved_tflops counts a whole UNet's FLOPs for every step; only this share of steps runs one
        return {"deepcache_full_step_share": 1 / self.interval}
