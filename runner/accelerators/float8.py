"""Float8 matrix products in the denoiser's transformer blocks (tensor cores of Hopper and Ada GPUs).

Every linear layer inside the denoiser's repeated blocks (diffusers' ``_repeated_blocks``: SDXL's transformer
blocks, which hold most of its UNet's matrix products) runs its product in ``torch._scaled_mm`` (float8 e4m3
operands, fp32 accumulation). Convolutions, attention's own products, norms and everything outside the blocks
stay in the pipeline's dtype. Lossy: the quality metrics against ``none`` say by how much. Two scalings:

- ``rowwise`` (``Float8Linear``): one scale per weight row, and one per input row (token) computed at every
  call. Quantising an input is then a reduction over its row and a cast, kernels that only a compiler fuses
  into their neighbours, and cuBLAS's per-row kernels are only 1.23x faster than fp16 ones on an H100
  (BENCHMARKS.md, "Faster still"): with inductor it was 13-29% slower than compile_graph.
- ``calibrated`` (``CalibratedFloat8Linear``): one scale per weight, and one per layer input fixed once, before
  anything is compiled, from the largest magnitude each input reaches in a calibration call of the pipeline
  (the job's own call arguments, with a seed no timed call uses), or one call per prompt of
  ``calibration_prompts`` (a prompt set other than the scored prompts, as a deployment would calibrate on).
  Quantising an input is then a multiply and a cast that inductor fuses into the kernel that makes the input,
  the product runs in cuBLAS's per-tensor kernels with the bias added in its epilogue, and inputs
  beyond the calibrated range saturate at e4m3's largest value.

With ``fast_accumulation``, cuBLAS accumulates the float8 products the way Hopper's tensor cores do natively
(``use_fast_accum``: partial sums are not promoted to full fp32 precision along the way), which is quicker and less
exact; torchao's float8 inference uses it for the forward pass. Its image change shows in the quality metrics.

With ``fuse_qkv``, the denoiser's attention projections are fused first (diffusers' ``fuse_qkv_projections``: a
self-attention's Q, K and V in one layer, ``attn1.to_qkv``; a cross-attention's K and V, ``attn2.to_kv``), so that
``include`` can name the fused layers and their one product of three times the width runs in float8; a
torch_compile with ``fuse_qkv`` after it then fuses the VAE's alone. Without it, a compile that fuses refuses
float8 Q, K or V layers, which diffusers cannot concatenate.

With ``fuse_geglu`` (calibrated only), each feed-forward whose GEGLU product and output layer are both float8 runs
its GEGLU and the quantising after it in one kernel (``runner/accelerators/float8_geglu.py``; Triton, Hopper GPUs).
``fuse_geglu=auto`` (fp8_compile's) fuses on Hopper GPUs, where it was measured faster, and leaves the layers apart
elsewhere (Ada's float8 GPUs), saying why in a tag.

It changes modules in place and must come first in a chain (stage ``quantize``): a compiler or a graph built
before it would hold the old layers. Eager float8 is slower than eager fp16; chain it before torch_compile
(conf/accelerator/fp8_compile.yaml).
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline

from runner.accelerators import Accelerator, Stage, Target, Wraps, device_named, require_triton
from runner.catalogue import Metric
from runner.config import ConfigError
from runner.inputs import load_prompts

FLOAT8 = getattr(torch, "float8_e4m3fn", None)
FLOAT8_MAX = torch.finfo(FLOAT8).max if FLOAT8 is not None else 448.0
ALIGN = 16  # torch._scaled_mm wants every dimension of both operands divisible by 16
SM89 = (8, 9)  # the first GPUs with float8 tensor cores (Ada; Hopper is 9.0)


def scale_of(amax: torch.Tensor) -> torch.Tensor:
    """The float32 scale that maps the magnitude ``amax`` to e4m3's largest value (448)."""
    return amax.detach().float().clamp(min=1e-12) / FLOAT8_MAX


def quantise(x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x`` times its calibrated scale's ``inverse`` in e4m3, saturated at its largest value. In float32, as
    inductor computes the multiply it fuses into the kernel that makes ``x``: eager and compiled round alike."""
    return (x.float() * inverse).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8)


def quantise_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` (rows x columns) in float8 e4m3 with one float32 scale per row: ``matrix ~= q * scale``.

    Each row's largest magnitude maps to e4m3's largest value (448), so no row overflows and small rows keep
    their precision."""
    scale = matrix.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FLOAT8_MAX
    return (matrix.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8), scale


class KeepsBufferDtypes(torch.nn.Module):
    """A module whose buffers hold its arithmetic's own types (float8 matrices, float32 scales, which
    ``torch._scaled_mm`` requires): a later cast of the whole model (``unet.half()``, ``pipe.to(torch.bfloat16)``)
    moves them where the model goes and leaves their dtypes, where ``nn.Module`` would cast every floating buffer
    (float8 to float16, for ``_scaled_mm`` to refuse; a float32 scale to float16's precision)."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "KeepsBufferDtypes":
        kept = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)  # parameters (the bias follows the model's dtype) and child modules
        finally:
            for name, buffer in kept.items():
                # where ``fn`` sends a tensor, read off an empty one, so no buffer is ever cast
                self._buffers[name] = None if buffer is None else buffer.to(fn(buffer.new_empty(0)).device)
        return self


class Float8Linear(KeepsBufferDtypes):
    """A linear layer whose matrix product runs in float8 with per-row scales (see the module's docstring)."""

    def __init__(self, linear: torch.nn.Linear, fast_accumulation: bool = False) -> None:
        super().__init__()
        self.fast_accumulation = fast_accumulation
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantise_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)  # (out, in) row-major: its transpose is the column-major B
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, out)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        pad = -rows.shape[0] % ALIGN  # e.g. cross-attention's 2 x 77 text tokens
        if pad:
            rows = F.pad(rows, (0, 0, 0, pad))
        quantised, scale = quantise_rows(rows)
        out = torch._scaled_mm(  # with per-row scales, bf16 is the only output type
            quantised,
            self.weight_fp8.t(),
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=torch.bfloat16,
            use_fast_accum=self.fast_accumulation,
        )
        out = out[: out.shape[0] - pad].to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        fast = ", fast accumulation" if self.fast_accumulation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3, per-row scales{fast}"


class CalibratedFloat8Linear(KeepsBufferDtypes):
    """A linear layer whose matrix product runs in float8 with one scale for its weight and one, calibrated
    beforehand, for its input (see the module's docstring)."""

    def __init__(self, linear: torch.nn.Linear, input_amax: torch.Tensor, fast_accumulation: bool = False) -> None:
        super().__init__()
        self.fast_accumulation = fast_accumulation
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        weight_scale = scale_of(weight.abs().amax())
        self.register_buffer("weight_fp8", (weight.float() / weight_scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(FLOAT8))
        self.register_buffer("weight_scale", weight_scale)
        input_scale = scale_of(input_amax)
        self.register_buffer("input_scale", input_scale)
        self.register_buffer("input_inverse", 1 / input_scale)  # a multiply, not a division, per element
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, pad = aligned_rows(x, self.in_features)
        out = self.product(quantise(rows, self.input_inverse), x.dtype)
        return out[: out.shape[0] - pad].reshape(*x.shape[:-1], self.out_features)

    def product(self, quantised: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's output in ``dtype`` for its input already quantised with its scale (rows x in)."""
        fused = self.bias is not None and dtype != torch.float32  # cuBLAS adds a bias to fp16/bf16 outputs only
        out = torch._scaled_mm(
            quantised,
            self.weight_fp8.t(),
            scale_a=self.input_scale,
            scale_b=self.weight_scale,
            bias=self.bias if fused else None,
            out_dtype=dtype,
            use_fast_accum=self.fast_accumulation,
        )
        return out + self.bias if self.bias is not None and not fused else out

    def extra_repr(self) -> str:
        fast = ", fast accumulation" if self.fast_accumulation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, float8 e4m3, calibrated scales{fast}"


def fuse_projections(denoiser: torch.nn.Module) -> None:
    """diffusers' fused attention projections in ``denoiser``, before its layers are converted (fuse_qkv)."""
    fuse = getattr(denoiser, "fuse_qkv_projections", None)
    if fuse is None:
        raise ConfigError(
            f"accelerator.fuse_qkv=true: {type(denoiser).__name__} cannot fuse its attention projections (diffusers' "
            "fuse_qkv_projections); set accelerator.fuse_qkv=false"
        )
    try:
        fuse()
    except ValueError as error:  # diffusers refuses attention with added key and value projections
        raise ConfigError(f"accelerator.fuse_qkv=true: {error}; set accelerator.fuse_qkv=false") from error


def aligned_rows(x: torch.Tensor, width: int) -> tuple[torch.Tensor, int]:
    """``x`` as rows of ``width``, padded with zero rows to a multiple of ALIGN (e.g. cross-attention's 2 x 77
    text tokens), and how many were added."""
    rows = x.reshape(-1, width)
    pad = -rows.shape[0] % ALIGN
    return (F.pad(rows, (0, 0, 0, pad)) if pad else rows), pad


def convertible(linear: torch.nn.Linear) -> bool:
    return linear.in_features % ALIGN == 0 and linear.out_features % ALIGN == 0


def block_linears(denoiser: torch.nn.Module, include: tuple[str, ...] = ()) -> list[tuple[torch.nn.Module, str]]:
    """The linear layers of ``denoiser``'s repeated blocks (only those whose name in their block contains one of
    ``include``, if given), each as (its parent module, its attribute name there)."""
    block_names = getattr(denoiser, "_repeated_blocks", None) or ()
    if not block_names:
        raise ConfigError(
            f"accelerator=fp8: {type(denoiser).__name__} names no repeated blocks whose linear layers to convert "
            "(diffusers' _repeated_blocks); use an accelerator without float8 for this model"
        )
    found = []
    for block in [module for module in denoiser.modules() if type(module).__name__ in block_names]:
        for path, parent in block.named_modules():
            for name, child in parent.named_children():
                qualified = f"{path}.{name}" if path else name  # e.g. attn1.to_q, ff.net.0.proj
                if replaced_by_fused(parent, name):
                    continue
                if type(child) is torch.nn.Linear and (not include or any(part in qualified for part in include)):
                    found.append((parent, name))
    return found


def replaced_by_fused(parent: torch.nn.Module, name: str) -> bool:
    """Whether ``parent.name`` is a projection diffusers' fused layer runs in its stead (it keeps the unfused ones,
    never called): a fused self-attention's Q, K and V, a fused cross-attention's K and V."""
    if not getattr(parent, "fused_projections", False):
        return False
    return name in ("to_k", "to_v") or (name == "to_q" and not parent.is_cross_attention)


def to_float8(
    denoiser: torch.nn.Module, include: tuple[str, ...] = (), fast_accumulation: bool = False
) -> tuple[int, int]:
    """Replace the linear layers of ``denoiser``'s repeated blocks by ``Float8Linear`` (only those whose name in
    their block contains one of ``include``, if given); return how many were replaced and how many were left
    (a dimension not divisible by 16)."""
    replaced = left = 0
    for parent, name in block_linears(denoiser, include):
        child = getattr(parent, name)
        if convertible(child):
            setattr(parent, name, Float8Linear(child, fast_accumulation))
            replaced += 1
        else:
            left += 1
    return replaced, left


def input_amax(layers: list[torch.nn.Module], call: Callable[[], Any]) -> list[torch.Tensor]:
    """The largest magnitude each of ``layers`` sees in its input during ``call()``, one 0-d float32 tensor
    each (zero for a layer the call never reached); kept on the device, so the call runs without syncing."""
    seen = [torch.zeros((), dtype=torch.float32, device=layer.weight.device) for layer in layers]

    def observe(amax: torch.Tensor) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: tuple) -> None:
            torch.maximum(amax, args[0].detach().abs().amax().float(), out=amax)

        return hook

    hooks = [layer.register_forward_pre_hook(observe(amax)) for layer, amax in zip(layers, seen, strict=True)]
    try:
        with torch.no_grad():
            call()
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def to_calibrated_float8(
    denoiser: torch.nn.Module,
    call: Callable[[], Any],
    include: tuple[str, ...] = (),
    fast_accumulation: bool = False,
) -> tuple[int, int]:
    """Calibrate the inputs of ``denoiser``'s block linear layers on one ``call()`` (which runs the pipeline),
    then replace them by ``CalibratedFloat8Linear``; return how many were replaced and how many were left (a
    dimension not divisible by 16, or an input the calibration call never reached)."""
    linears = block_linears(denoiser, include)
    chosen = [place for place in linears if convertible(getattr(*place))]
    amaxes = input_amax([getattr(*place) for place in chosen], call)
    replaced = 0
    for (parent, name), amax in zip(chosen, amaxes, strict=True):
        if amax.item() > 0:
            setattr(parent, name, CalibratedFloat8Linear(getattr(parent, name), amax, fast_accumulation))
            replaced += 1
    return replaced, len(linears) - replaced


SCALINGS = ("rowwise", "calibrated")
# What fuse_geglu=auto fuses on: GPUs of the major compute capabilities where the fused kernel was measured faster
# than the two layers apart, in a whole call (9: Hopper; BENCHMARKS.md, "Float8's fast accumulation and fused GEGLU
# in fp8_compile"). Elsewhere auto leaves every feed-forward's layers apart.
AUTO_GEGLU = {9: "Hopper"}


@dataclass
class Float8Accelerator(Accelerator):
    include: list[str] = field(default_factory=list)  # only the linear layers whose name contains one of these
    scaling: str = "rowwise"  # rowwise | calibrated (the module's docstring says what each does)
    calibration_prompts: str = ""  # calibrated: a shipped prompt set or a file, one call each; "": the job's prompt
    fast_accumulation: bool = False  # cuBLAS's fast float8 accumulation (use_fast_accum): quicker, less exact
    # calibrated: each feed-forward's GEGLU and the quantising after it in one kernel; auto: on Hopper (AUTO_GEGLU)
    fuse_geglu: bool | str = False
    fuse_qkv: bool = False  # the denoiser's attention projections fused before converting (include: attn1.to_qkv)

    wraps: ClassVar[Wraps] = Wraps.IN_PLACE
    stage: ClassVar[Stage] = Stage.QUANTIZE
    catalogue: ClassVar[tuple[Metric, ...]] = (
        Metric("float8_linears", "linear layers in float8", "", "{:.0f}"),
        Metric("float8_geglus_fused", "float8 feed-forwards with their GEGLU in one kernel", "", "{:.0f}"),
    )

    def check(self, device: torch.device) -> None:
        if self.scaling not in SCALINGS:
            raise ConfigError(
                f"accelerator.scaling={self.scaling}: choose rowwise (per-row scales computed at every call) or "
                "calibrated (per-tensor scales fixed by a calibration call)"
            )
        if self.calibration_prompts and self.scaling != "calibrated":
            raise ConfigError(
                f"accelerator.calibration_prompts={self.calibration_prompts} sets what calibrated scales are fixed "
                f"on, and this is scaling={self.scaling}: add accelerator.scaling=calibrated, or drop it"
            )
        if self.calibration_prompts:
            load_prompts(self.calibration_prompts, "", key="accelerator.calibration_prompts")
        if self.fuse_geglu not in (False, True, "auto"):
            raise ConfigError(
                f"accelerator.fuse_geglu={self.fuse_geglu}: choose true, false or auto (the fused kernel on Hopper "
                "GPUs, where it was measured faster; the layers apart elsewhere)"
            )
        if self.fuse_geglu and self.scaling != "calibrated":
            raise ConfigError(
                f"accelerator.fuse_geglu={self._fuse_geglu_value()} quantises the GEGLU's output with the next "
                f"layer's calibrated scale, and this is scaling={self.scaling}: add accelerator.scaling=calibrated, "
                "or drop fuse_geglu"
            )
        if FLOAT8 is None or not hasattr(torch, "_scaled_mm"):
            raise ConfigError(
                f"accelerator=fp8 needs torch with float8 matrix products (torch >= 2.4); this is torch "
                f"{torch.__version__}: pip install -U torch"
            )
        if device.type == "cuda" and torch.cuda.get_device_capability(device) < SM89:
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"accelerator=fp8 needs float8 tensor cores (compute capability 8.9 or newer: Ada, Hopper); "
                f"{name} has {'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use "
                "accelerator=compile_graph on this GPU"
            )
        if self.fuse_geglu is True and device.type == "cuda":
            self._check_kernel(device)

    def _fuse_geglu_value(self) -> str:
        return str(self.fuse_geglu).lower()  # as written on the command line: true, false, auto

    def _fuses_geglus(self, device: torch.device) -> tuple[bool, str]:
        """Whether fuse_geglu fuses on ``device`` and, where auto leaves the layers apart, why."""
        if self.fuse_geglu != "auto":
            return bool(self.fuse_geglu), ""
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] in AUTO_GEGLU:
            try:
                import triton  # noqa: F401
            except ImportError as error:
                return False, f"fuse_geglu=auto: Triton is not installed ({error})"
            return True, ""
        runs = ", ".join(f"{name} GPUs (compute capability {major}.x)" for major, name in AUTO_GEGLU.items())
        where = device_named(device)
        return False, f"fuse_geglu=auto fuses on {runs} only, where it was measured faster; not on {where}"

    def _check_kernel(self, device: torch.device) -> None:
        """fuse_geglu's kernel on this GPU: Hopper's tensor memory accelerator, and Triton to build it."""
        if torch.cuda.get_device_capability(device) < (9, 0):
            name = torch.cuda.get_device_name(device)
            raise ConfigError(
                f"accelerator.fuse_geglu=true runs a kernel fed by Hopper's tensor memory accelerator (compute "
                f"capability 9.0 or newer); {name} has "
                f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: drop fuse_geglu on this GPU"
            )
        require_triton("accelerator.fuse_geglu=true", "drop fuse_geglu")

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        denoiser = getattr(pipe, target.denoiser)
        if self.fuse_qkv:
            fuse_projections(denoiser)
        if self.scaling == "calibrated":
            if target.calibration is None:
                raise ConfigError("accelerator.scaling=calibrated needs a calibration call of the pipeline")
            prompts = load_prompts(self.calibration_prompts, "") if self.calibration_prompts else []
            calibrate = target.calibration
            self.converted, self.left = to_calibrated_float8(
                denoiser, lambda: calibrate(prompts), tuple(self.include), self.fast_accumulation
            )
        else:
            self.converted, self.left = to_float8(denoiser, tuple(self.include), self.fast_accumulation)
        if self.include and not self.converted and not self.left:
            fused = [name for name in self.include if "to_qkv" in name or "to_kv" in name]
            fix = (
                f"{fused[0]} is a fused layer: add accelerator.fuse_qkv=true"
                if fused and not self.fuse_qkv
                else "give parts of names such as attn1.to_q or ff.net.0.proj, or include=[] for all"
            )
            raise ConfigError(
                f"accelerator.include={list(self.include)}: no linear layer in the denoiser's repeated blocks is "
                f"named like that; {fix}"
            )
        if not self.converted:
            raise ConfigError(
                f"accelerator=fp8: none of the {self.left} linear layers in the denoiser's repeated blocks has "
                f"dimensions divisible by {ALIGN}; use an accelerator without float8 for this model"
            )
        fuse, self.geglus_aside = self._fuses_geglus(target.device)
        if fuse:
            from runner.accelerators.float8_geglu import fuse_geglus  # it builds on this module's layers

            self.geglus_fused, self.geglus_left = fuse_geglus(denoiser)
            if not self.geglus_fused:
                none = (
                    f"none of the denoiser's {self.geglus_left} GEGLU feed-forwards has both its GEGLU's product and "
                    f"its output layer in float8 (include={list(self.include)})"
                )
                if self.fuse_geglu == "auto":  # a model without such feed-forwards runs float8 all the same
                    self.geglus_aside = f"fuse_geglu=auto: {none}"
                    return
                raise ConfigError(
                    f"accelerator.fuse_geglu=true: {none}: include both, e.g. include=[ff.], or drop fuse_geglu"
                )

    def metrics(self) -> dict[str, float]:
        fused = {"float8_geglus_fused": float(self.geglus_fused)} if hasattr(self, "geglus_fused") else {}
        return {"float8_linears": float(getattr(self, "converted", 0))} | fused

    def tags(self) -> dict[str, str]:
        tags = {"float8_linears_left": str(getattr(self, "left", 0))}
        if hasattr(self, "geglus_left"):
            tags["float8_geglus_left"] = str(self.geglus_left)
        if getattr(self, "geglus_aside", ""):
            tags["float8_geglu"] = f"layers apart: {self.geglus_aside}"
        if self.scaling == "calibrated":
            tags["float8_calibration"] = self.calibration_prompts or "the job's prompt"
        return tags
