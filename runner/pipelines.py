"""Building the diffusers pipeline a job measures.

``weights=pretrained`` loads a checkpoint by hub id or local folder (safetensors only, never code from the
checkpoint). ``weights=random`` builds the same architecture from the configs shipped under
``runner/architectures/<name>/`` (a hub repository's layout without the weights) with seeded random
weights: no download, and it times exactly like the real model.
"""

import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from hydra.utils import get_class

from runner.config import ModelConfig
from runner.errors import RunnerError, one_line

ARCHITECTURES = Path(__file__).parent / "architectures"
CLIP_MAX_LENGTH = 77
REASON_CHARS = 160  # diffusers' loading errors run to a paragraph; the error tag keeps their start


class ModelLoadError(RunnerError, RuntimeError):
    """A checkpoint that cannot be loaded; the message names the model and the ways around it."""


def build_pipeline(model: ModelConfig, task: str, device: torch.device, dtype: torch.dtype) -> DiffusionPipeline:
    """The model's pipeline for ``task``, on ``device`` in ``dtype``, with the model's scheduler."""
    pipeline_cls = get_class(model.tasks[task].pipeline)
    if model.weights == "pretrained":
        pipe = load_pretrained(pipeline_cls, model, dtype)
    else:
        pipe = build_random(pipeline_cls, model.architecture, model.load_args, model.init_seed, device, dtype)
    if model.scheduler is not None:
        scheduler_cls = get_class(model.scheduler.scheduler)
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **model.scheduler.options)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # the runner reports progress per call, not per step
    return pipe


def load_pretrained(pipeline_cls: type, model: ModelConfig, dtype: torch.dtype) -> DiffusionPipeline:
    """Load by hub id or local folder; failures name the model and offer random weights or a local copy."""
    assert model.id is not None
    looks_local = model.id.startswith((".", "/", "~")) or Path(model.id).expanduser().exists()
    if looks_local and not Path(model.id).expanduser().is_dir():
        raise ModelLoadError(f"model.id={model.id}: no such folder; give a saved pipeline's folder or a hub id")
    source = str(Path(model.id).expanduser()) if looks_local else model.id
    try:
        return pipeline_cls.from_pretrained(
            source,
            torch_dtype=dtype,
            variant=model.variant,
            revision=model.revision,
            use_safetensors=True,  # never unpickle a checkpoint
            **model.load_args,
        )
    except (OSError, ValueError) as error:
        reason = one_line(error)
        reason = reason if len(reason) <= REASON_CHARS else reason[: REASON_CHARS - 3] + "..."
        hint = (
            "set model.variant=null if the checkpoint publishes no fp16 files; "
            if model.variant and "variant" in reason
            else ""
        )
        raise ModelLoadError(
            f"model.id={model.id} could not be loaded ({reason}); {hint}with no hub access use "
            "model.weights=random (same architecture, random weights: right for timing, not for image "
            "quality) or model.id=/path/to/a/downloaded/copy"
        ) from error


def build_random(
    pipeline_cls: type,
    architecture: str,
    load_args: dict[str, Any],
    seed: int,
    device: torch.device,
    dtype: torch.dtype,
) -> DiffusionPipeline:
    """Build ``pipeline_cls`` from an architecture folder with seeded random weights on ``device``."""
    folder = ARCHITECTURES / architecture
    if not folder.is_dir():
        known = ", ".join(sorted(p.name for p in ARCHITECTURES.iterdir() if p.is_dir()))
        raise ModelLoadError(f"model.architecture={architecture}: not shipped; choose one of {known}")
    index = json.loads((folder / "model_index.json").read_text())
    torch.manual_seed(seed)
    parts: dict[str, Any] = {}
    for name, entry in index.items():
        if not name.startswith("_"):
            parts[name] = _build_component(folder, name, entry, device, dtype) if isinstance(entry, list) else entry
    parts.update(load_args)
    accepted = inspect.signature(pipeline_cls.__init__).parameters
    return pipeline_cls(**{name: value for name, value in parts.items() if name in accepted})


def _build_component(folder: Path, name: str, entry: list, device: torch.device, dtype: torch.dtype) -> Any:
    library, class_name = entry
    if library is None:
        return None
    cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
    if issubclass(cls, transformers.PreTrainedTokenizerBase):
        return clip_tokenizer(cls)
    if issubclass(cls, SchedulerMixin):  # on the CPU: schedulers hand their tables to numpy
        return cls.from_pretrained(folder, subfolder=name)
    if issubclass(cls, diffusers.ModelMixin):
        with torch.device(device):  # weights are initialised where they will run: fast, no copy
            return cls.from_config(cls.load_config(folder / name)).to(dtype).eval()
    if issubclass(cls, transformers.PreTrainedModel):
        config = transformers.AutoConfig.from_pretrained(folder / name)
        with torch.device(device):
            return cls(config).to(dtype).eval()
    raise ModelLoadError(f"{folder.name}/model_index.json: cannot build {name} ({library}.{class_name})")


def clip_tokenizer(cls: type = transformers.CLIPTokenizer) -> Any:
    """A CLIP tokenizer with a minimal byte-level vocabulary (no merges), built in code.

    Every byte is a token, so any prompt tokenizes to ids the text encoders accept; prompts are padded to
    77 tokens like the real tokenizer's, which is what timing depends on.
    """
    alphabet = _byte_alphabet()
    tokens = alphabet + [ch + "</w>" for ch in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n")
        return cls.from_pretrained(folder, model_max_length=CLIP_MAX_LENGTH)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE vocabularies (GPT-2, CLIP) use."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
