"""The host runs ahead of the GPU through the pipeline's setup: the schedule and SDXL's time ids are made on the
host and sent to the GPU without waiting for it.

Between encoding the prompt and the first denoising step a diffusers pipeline sets the scheduler's timesteps
and, for SDXL, makes the "time ids" (original size, crop, target size) on the host, and sends them to the GPU
with plain ``.to(device)``: a copy from pageable memory, which waits until the GPU has finished everything queued
before it. Diffusers' schedulers even send the sigmas to the GPU and back (``sigmas.to("cpu")``, "to avoid too
much CPU/GPU communication"). With the prompt's encoding queued just before, the host stops there until the
text encoders have run: in an H200 profile of a ``compile_graph_fast`` call at 512 px it waited 1.9 ms for
their 2.8 ms of GPU work, with the rest of the setup (latents, time ids, the step's arguments) still to do
after it (BENCHMARKS.md, "the prompt's encoding as one graph").

Here the scheduler's ``set_timesteps`` runs on the host (``device="cpu"``) and the tensors that diffusers' own
would have left on the GPU are sent there from pinned memory without waiting (``non_blocking``): which ones is
learnt from the first call (the runner's warmup), which runs diffusers' own unchanged before the host's way, so
any scheduler keeps its own split between host and GPU, and the warmup, not a timed call, pays for the first
pinned buffer. SDXL's time ids go the same way as they are made. The same values (made on
the host either way, or the same arithmetic on the host instead of the GPU; the GPU test compares them), so the
same images; the host's next wait is at the scheduler's first step, where it reads the step's index back. On
an H200 it took ``compile_graph_fast``'s time before the first step from 6.8 to 4.9 ms at 512 px and its calls
from 0.3309 to 0.3280 s on one start (BENCHMARKS.md, "the host ahead of the GPU"); on the next start, in both
orders, 0.4-2.3 ms at 512 px, 0.5 ms at 1024 px, and 1.2-1.9 ms off ``fp8_compile`` at 1024 px ("the GEGLU in
one kernel"). Part of ``compile_graph_fast`` and ``fp8_compile``, last. Beside ``deepcache_compile`` (the variant
``dc_host_ahead`` in ``benchmarks/conf/accelerator``) it gained nothing beyond the order of a pair: 0.5165 s
against 0.5200 s at 1024 px, run second ("the fused GEGLU's tma kernel on a GPU"), so it is not part of it. A
part that binds ``set_timesteps`` on the scheduler itself before this one (as DeepCache did until ``6af8233``)
hides the scheduler's class from it: the warmup's end says so, and the job fails with the fix, instead of timing
diffusers' own schedule under this part's name.

Only ``set_timesteps`` called with ``device=`` (as diffusers' pipelines call it) and ``_get_add_time_ids``
(SDXL's pipelines); anything else runs as diffusers wrote it. Image-to-image's input image is sent the same way
by ``device_images``, which makes it float32 on the GPU.
"""

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from runner.accelerators import Accelerator, Target, named_like
from runner.config import ConfigError
from runner.errors import RunnerError


def sent_ahead(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; from the host to a GPU through pinned memory, without the host waiting (torch's
    pinned-memory cache keeps the buffer until the copy has run)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def tensors_on(obj: Any, device: torch.device) -> set[str]:
    return {name for name, value in vars(obj).items() if isinstance(value, torch.Tensor) and value.device == device}


def scheduler_ahead(cls: type[SchedulerMixin]) -> dict[str, Any]:
    """``cls``'s ``set_timesteps`` run on the host, then what it leaves on the device, sent there."""

    def set_timesteps(self: SchedulerMixin, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("device") is None:
            return cls.set_timesteps(self, *args, **kwargs)
        device = torch.empty(0, device=kwargs["device"]).device  # "cuda" as tensors name it: cuda:0
        if device not in self._runner_on_device:  # the first call: diffusers' own, to learn what it puts there,
            cls.set_timesteps(self, *args, **kwargs)  # then the host's way too, so that the warmup pays its first
            self._runner_on_device[device] = tensors_on(self, device)  # pinned buffer, not a timed call
        cls.set_timesteps(self, *args, **(kwargs | {"device": "cpu"}))
        for name in self._runner_on_device[device]:
            setattr(self, name, sent_ahead(getattr(self, name), device))
        self._runner_sent_ahead += 1
        return None

    return {"set_timesteps": set_timesteps}


def time_ids_ahead(cls: type[DiffusionPipeline]) -> dict[str, Any]:
    """``cls``'s SDXL time ids as it makes them (one tensor, or a pair for image-to-image), sent to the
    pipeline's device as they are made."""

    def _get_add_time_ids(self: DiffusionPipeline, *args: Any, **kwargs: Any) -> Any:
        made = cls._get_add_time_ids(self, *args, **kwargs)
        device = self._runner_host_ahead_device
        if isinstance(made, tuple):
            return tuple(sent_ahead(ids, device) for ids in made)
        return sent_ahead(made, device)

    return {"_get_add_time_ids": _get_add_time_ids}


@dataclass
class HostAheadAccelerator(Accelerator):
    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        scheduler = getattr(pipe, "scheduler", None)
        if not isinstance(scheduler, SchedulerMixin):
            raise ConfigError(
                f"host_ahead: {type(pipe).__name__} has no diffusers scheduler whose schedule it could make on the "
                "host; use an accelerator without HostAheadAccelerator among its parts, e.g. accelerator=compile_graph"
            )
        scheduler.__class__ = named_like(type(scheduler), "host_ahead", scheduler_ahead(type(scheduler)))
        scheduler._runner_on_device, scheduler._runner_sent_ahead = {}, 0
        self.scheduler, self.time_ids = scheduler, hasattr(pipe, "_get_add_time_ids")
        self.timesteps_at_apply = getattr(scheduler, "timesteps", None)
        if self.time_ids:
            pipe.__class__ = named_like(type(pipe), "host_ahead", time_ids_ahead(type(pipe)))
            pipe._runner_host_ahead_device = target.device

    def warmed_up(self, pipe: DiffusionPipeline) -> None:
        # A schedule was set (the timesteps are new), but not through this part: its runs would time diffusers'
        # own schedule under its name. (With warmup=0 nothing was set yet, and nothing can be told.)
        scheduled = getattr(self.scheduler, "timesteps", None) is not self.timesteps_at_apply
        if scheduled and self.scheduler._runner_sent_ahead == 0:
            raise RunnerError(
                f"host_ahead: the warmup called {type(self.scheduler).__name__}.set_timesteps without it; something "
                "binds that method on the scheduler itself (instead of calling its class's, as DeepCache does) "
                "and must stand after HostAheadAccelerator in the chain, or leave host_ahead out"
            )

    def tags(self) -> dict[str, str]:
        if not hasattr(self, "scheduler"):
            return {}
        name = type(self.scheduler).__name__
        sent = [f"{name}.{tensor}" for tensor in sorted(set().union(*self.scheduler._runner_on_device.values()))]
        return {
            "host_ahead": ", ".join(sent + ["time ids"] * self.time_ids),
            "host_ahead_calls": str(self.scheduler._runner_sent_ahead),
        }
