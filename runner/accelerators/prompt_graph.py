"""SDXL's prompt encoding as one CUDA graph: both text encoders and what the pipeline makes of their outputs.

Before its first denoising step an SDXL pipeline call encodes the prompt, and on a GPU the host's Python there
outlasts the GPU's work: for each of its two text encoders diffusers tokenizes the prompt twice (the second
time only to warn if it was truncated), walks every module of the encoder to find its execution device
(``get_module_execution_device``), runs it, and keeps one of its 13 or 33 hidden states; then it joins them,
makes the unguided embeddings zeros and repeats them per image, one operation at a time. With the encoders
graphed one by one (``cuda_graph``'s ``text_encoders``) each replay also returned a copy of every hidden state:
50 copies a call. In an H200 profile of a ``compile_graph_fast`` call at 1024 px the host spent 8.6 ms from the
call's first operation to the first step while the GPU had 2.8 ms of work, 2.1 ms of it in the two walks and
0.8 ms in the copies (BENCHMARKS.md, "the prompt's encoding as one graph").

Here the GPU's part of it all, from both tokenizers' ids to the four embeddings ``encode_prompt`` returns, is
one module (``SdxlPromptEncoders``), captured on CUDA as one graph per input shape, images per prompt and
guidance; the host tokenizes once per encoder, copies the ids in and replays. The same operations in the same
order on the same inputs, so the same embeddings (the tests compare them with diffusers' own, bit for bit). The
truncation warning is said once per prompt and tokenizer, not at every call, and the prompt is tokenized again
for textual inversion only where a token of several vectors was loaded (diffusers: always). On the CPU the
module runs eagerly.
On an H200 it took ``compile_graph_fast``'s time before the first step from 8.7 to 6.5 ms at 512 px and from
12.4 to 6.3 ms at 1024 px, its calls from 0.334 to 0.331 s and from 0.982 to 0.975 s, each pair on one start;
``fp8_compile`` and ``deepcache_compile`` gained 0.1-2.0% (BENCHMARKS.md, "the prompt's encoding as one graph").
Part of those three accelerators, last.

With ``compile_encoders`` the encoders' module is compiled (torch.compile) before it is captured, SDXL's way
only: with the host's work cut, the host waited for the encoders' 2.8 ms of GPU work at the scheduler's first
blocking copy (1.9 ms at 512 px), 1.5 ms of it matrix products of 77 rows whose weights read in about 0.35 ms.
On one H200 start at 512 px it took ``compile_graph_fast``'s time before the first step from 6.8 to 4.8 ms (and,
beside ``host_ahead``, from 4.9 to 3.9 ms; calls 0.3280 against 0.3271 s), for the encoders compiled in every
process: a warmup of 11.9 s against 3.9 s from the saved modules, and images changed by rounding (BENCHMARKS.md,
"the host ahead of the GPU"). So it is an option, in no accelerator; the variants ``cg_fast_prompt_compiled``
and ``cg_fast_ahead_compiled`` in ``benchmarks/conf/accelerator`` hold it.

The whole encoding only for SDXL's pipelines (two CLIP text encoders; text-to-image and image-to-image); a
pipeline that encodes its prompt its own way (instruct-pix2pix) has each text encoder graphed on its own, as
``cuda_graph``'s ``text_encoders`` does (the tag ``prompt_graph`` says which). And only the default way to call
them: a prompt and nothing that replaces it (no ``prompt_2``, no negative prompt, no embeddings given, no
LoRA scale or ``clip_skip``), with the unguided embeddings zeros where guidance is on
(``force_zeros_for_empty_prompt``, SDXL base's and RealVisXL's config). A call any other way runs diffusers'
own ``encode_prompt``, unchanged, and is counted (the tag ``prompt_graph_passed_on``).
"""

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.loaders import TextualInversionLoaderMixin
from diffusers.utils import logging
from transformers import PreTrainedModel

from runner.accelerators import Accelerator, Target, named_like
from runner.accelerators.cuda_graph import GraphedModule, MemoryPool, graph_text_encoders, text_encoder_names
from runner.config import ConfigError

# encode_prompt's arguments that its default way leaves at None: with any of them given, diffusers' own runs.
OTHER_WAYS = (
    "prompt_2",
    "negative_prompt",
    "negative_prompt_2",
    "prompt_embeds",
    "negative_prompt_embeds",
    "pooled_prompt_embeds",
    "negative_pooled_prompt_embeds",
    "lora_scale",
    "clip_skip",
)
Embeddings = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]


class SdxlPromptEncoders(torch.nn.Module):
    """From both tokenizers' ids to what SDXL's ``encode_prompt`` returns in its default way (prompt embeddings,
    unguided ones, pooled ones, unguided pooled ones), operation for operation as diffusers computes them."""

    def __init__(self, pipe: DiffusionPipeline, images_per_prompt: int, guidance: bool) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2 = pipe.text_encoder, pipe.text_encoder_2
        self.images_per_prompt, self.guidance = images_per_prompt, guidance

    def forward(self, ids: torch.Tensor, ids_2: torch.Tensor) -> Embeddings:
        pooled, hidden = None, []
        for encoder, token_ids in ((self.text_encoder, ids), (self.text_encoder_2, ids_2)):
            output = encoder(token_ids, output_hidden_states=True)
            if pooled is None and output[0].ndim == 2:  # the pooled output: the final text encoder's
                pooled = output[0]
            hidden.append(output.hidden_states[-2])
        embeds = torch.concat(hidden, dim=-1)
        negative = torch.zeros_like(embeds) if self.guidance else None
        negative_pooled = torch.zeros_like(pooled) if self.guidance else None
        n, dtype = self.images_per_prompt, self.text_encoder_2.dtype
        batch, tokens, _ = embeds.shape
        embeds = embeds.to(dtype=dtype).repeat(1, n, 1).view(batch * n, tokens, -1)
        pooled = pooled.repeat(1, n).view(batch * n, -1)
        if self.guidance:
            negative = negative.to(dtype=dtype).repeat(1, n, 1).view(batch * n, tokens, -1)
            negative_pooled = negative_pooled.repeat(1, n).view(batch * n, -1)
        return embeds, negative, pooled, negative_pooled


class PromptGraph:
    """A pipeline's ``encode_prompt`` in its default way: tokenize, then run (on CUDA, replay) the encoders'
    module for the call's images per prompt and guidance; any other way, diffusers' own."""

    def __init__(self, pipe: DiffusionPipeline, device: torch.device, compile_encoders: bool = False) -> None:
        self.compile_encoders = compile_encoders
        self.original = type(pipe).encode_prompt
        self.signature = inspect.signature(self.original)
        self.device = device
        self.pool = MemoryPool() if device.type == "cuda" else None
        self.encoders: dict[tuple[int, bool], torch.nn.Module] = {}
        self.checked: set[tuple[int, tuple[str, ...]]] = set()  # (tokenizer, prompts) checked for truncation
        self.passed_on = 0

    def __call__(self, pipe: DiffusionPipeline, *args: Any, **kwargs: Any) -> Embeddings:
        bound = self.signature.bind(pipe, *args, **kwargs)
        bound.apply_defaults()
        given = bound.arguments
        prompt, guidance = given["prompt"], bool(given["do_classifier_free_guidance"])
        device = torch.device(given["device"] or pipe._execution_device)
        if (
            any(given[name] is not None for name in OTHER_WAYS)
            or not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt)))
            or (guidance and not pipe.config.force_zeros_for_empty_prompt)
            or device != self.device
        ):
            self.passed_on += 1
            return self.original(pipe, *args, **kwargs)
        prompts = [prompt] if isinstance(prompt, str) else prompt
        ids = [self._token_ids(pipe, prompts, tokenizer).to(device) for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)]
        return self._encoders(pipe, given["num_images_per_prompt"], guidance)(*ids)

    def _encoders(self, pipe: DiffusionPipeline, images_per_prompt: int, guidance: bool) -> torch.nn.Module:
        key = (images_per_prompt, guidance)
        if key not in self.encoders:
            module = SdxlPromptEncoders(pipe, images_per_prompt, guidance)
            if self.compile_encoders:  # compiled in the capture's eager calls, then its kernels captured
                module = torch.compile(module)
            self.encoders[key] = GraphedModule(module, warmup_calls=2, pool=self.pool) if self.pool else module
        return self.encoders[key]

    def _token_ids(self, pipe: DiffusionPipeline, prompts: list[str], tokenizer: Any) -> torch.Tensor:
        if isinstance(pipe, TextualInversionLoaderMixin) and multi_vector_tokens(tokenizer):
            prompts = pipe.maybe_convert_prompt(prompts, tokenizer)
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        if (id(tokenizer), tuple(prompts)) not in self.checked:
            self.checked.add((id(tokenizer), tuple(prompts)))
            warn_if_truncated(pipe, prompts, tokenizer, ids)
        return ids


def multi_vector_tokens(tokenizer: Any) -> bool:
    """Whether textual inversion gave the tokenizer a token of several vectors (``<cat>``, ``<cat>_1``, ...): the
    only case in which diffusers' ``maybe_convert_prompt`` changes a prompt, which it tokenizes once more to find
    out (75 us a tokenizer on the CPU machine)."""
    added = tokenizer.added_tokens_encoder
    return any(f"{token}_1" in added for token in added)


def warn_if_truncated(pipe: DiffusionPipeline, prompts: list[str], tokenizer: Any, ids: torch.Tensor) -> None:
    """The warning diffusers gives when the tokenizer cut the prompt short, in its words and on its logger."""
    untruncated = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
    if untruncated.shape[-1] >= ids.shape[-1] and not torch.equal(ids, untruncated):
        removed = tokenizer.batch_decode(untruncated[:, tokenizer.model_max_length - 1 : -1])
        logging.get_logger(type(pipe).__module__).warning(
            "The following part of your input was truncated because CLIP can only handle sequences up to"
            f" {tokenizer.model_max_length} tokens: {removed}"
        )


@dataclass
class PromptGraphAccelerator(Accelerator):
    compile_encoders: bool = False  # torch.compile the encoders' module before it is captured (SDXL's way only)

    def apply(self, pipe: DiffusionPipeline, target: Target) -> None:
        if any(
            isinstance(part, GraphedModule) and isinstance(part.module, PreTrainedModel)
            for part in pipe.components.values()
        ):
            raise ConfigError(
                "prompt_graph: the text encoders are already graphed one by one (cuda_graph's text_encoders=true), "
                "and a graph cannot hold another's replay; set that part's text_encoders to false"
            )
        names = text_encoder_names(pipe)
        if not names:
            raise ConfigError(
                f"prompt_graph: {type(pipe).__name__} has no text encoder (no transformers model among its "
                "components) whose calls it could capture; use an accelerator without PromptGraphAccelerator among its "
                "parts, e.g. accelerator=compile_graph"
            )
        device = next(getattr(pipe, names[0]).parameters()).device  # cuda:0, as the pipeline's calls name it
        self.graph, self.graphed = None, []  # state, not options: no dataclass fields
        if not sdxl_prompt_encoding(pipe):  # its own way of encoding: each text encoder graphed on its own
            if self.compile_encoders:
                raise ConfigError(
                    f"prompt_graph.compile_encoders=true: {type(pipe).__name__} encodes its prompt its own way, "
                    "whose text encoders prompt_graph graphs one by one and does not compile; set it to false"
                )
            if device.type == "cuda":
                self.graphed = graph_text_encoders(pipe, warmup_calls=2, pool=MemoryPool())
            return
        self.graph = PromptGraph(pipe, device, self.compile_encoders)
        pipe.__class__ = named_like(type(pipe), "prompt_graph", {"encode_prompt": encode_prompt})
        pipe._runner_prompt_graph = self.graph

    def tags(self) -> dict[str, str]:
        if not hasattr(self, "graph"):
            return {}
        if self.graph is None:
            return {"prompt_graph": "each text encoder", "prompt_graphs_captured": str(captured(self.graphed))}
        encoders = [e for e in self.graph.encoders.values() if isinstance(e, GraphedModule)]
        return {
            "prompt_graph": "whole",
            "prompt_graphs_captured": str(captured(encoders)),
            "prompt_graph_passed_on": str(self.graph.passed_on),
        }


def sdxl_prompt_encoding(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline encodes prompts as SDXL's do: both CLIP text encoders, and a second prompt for the
    second."""
    encode = getattr(type(pipe), "encode_prompt", None)
    both = all(getattr(pipe, name, None) is not None for name in ("text_encoder", "text_encoder_2"))
    return both and encode is not None and "prompt_2" in inspect.signature(encode).parameters


def captured(graphed: list[GraphedModule]) -> int:
    return sum(len(module.graphs) for module in graphed)


def encode_prompt(self: DiffusionPipeline, *args: Any, **kwargs: Any) -> Embeddings:
    return self._runner_prompt_graph(self, *args, **kwargs)
