"""Base model loading: a local HF directory, a model id (the local HF cache, else downloaded
from the Hub or `HF_ENDPOINT`'s mirror: hub.py; never with `HF_HUB_OFFLINE=1`), a `.gguf` file,
or (no model given) the embedded default SmolLM2-135M-Instruct.

Owns device/dtype resolution and the facts the engine needs about a model (`LoadedModel`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mara_serve.engine.default_model import (
    DEFAULT_MODEL_NAME,
    default_cache_dir,
    ensure_default_model,
)
from mara_serve.engine.errors import ModelLoadError
from mara_serve.engine.quantization import QUANTIZATIONS, quantize_int8
from mara_serve.engine.weights import DecoderWeights

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None  # None → the embedded default
    device: str = "auto"  # cpu | cuda | cuda:N | auto
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    cache_dir: Path = field(default_factory=default_cache_dir)  # where the default model lives
    max_model_len: int | None = None  # None → the model's own context length
    revision: str | None = None  # a Hub model's branch, tag or commit (None: main)
    quantization: str = "none"  # none | int8 (weight-only, CPU: quantization.py)


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM, eval mode
    tokenizer: object
    name: str  # the id the API serves it under
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    vocab_size: int
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    quantization: str = "none"  # none | int8: the projections' weights (quantization.py)
    # The batched runner's tensors, laid out once here (None: an architecture the runner does
    # not implement; the serial reference still works).
    weights: DecoderWeights | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if DecoderWeights.supports(self.model):
            self.weights = DecoderWeights.from_hf(self.model)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the model's parameters and buffers, each storage counted once (tied and
        fused weights share storage; int8 weights count one byte per value)."""
        seen: dict[int, int] = {}
        for t in (*self.model.parameters(), *self.model.buffers()):
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        return sum(seen.values())


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but CUDA is not available")
    return dev


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (or from `cpuinfo`): x86's `flags` line, or
    ARM's `Features`; empty where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:  # not Linux: no cheap, reliable check
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_fast_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX-BF16). There,
    bf16 weights halve the bytes a decode step reads and matmuls run at 2-3x the float32 speed;
    without them torch emulates bf16 and float32 is faster."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags(cpuinfo))


def cpu_has_amx(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has AMX bf16 tiles (oneDNN's bf16 matmuls then run many rows at about
    the cost of one)."""
    return "amx_bf16" in cpu_flags(cpuinfo)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it (else float16); on a CPU bfloat16 when it has
    native bf16 matmuls (`cpu_has_fast_bf16`), else float32."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _source(cfg: ModelConfig) -> tuple[str, dict, str]:
    """(from_pretrained path-or-id, extra kwargs, served name)."""
    if cfg.model is None or cfg.model == "":
        return str(ensure_default_model(Path(cfg.cache_dir))), {}, DEFAULT_MODEL_NAME
    p = Path(cfg.model).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {p}")
        return str(p.parent), {"gguf_file": p.name}, p.stem
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{p} is not a Hugging Face model directory (no config.json)")
        return str(p), {}, p.name
    if p.exists():
        raise ModelLoadError(f"{p} is neither a model directory nor a .gguf file")
    pinned = {"revision": cfg.revision} if cfg.revision else {}
    if _in_local_cache(cfg.model, cfg.revision) or _offline():
        return cfg.model, {"local_files_only": True, **pinned}, cfg.model
    from mara_serve.engine.hub import download_model

    return str(download_model(cfg.model, cfg.revision)), {}, cfg.model


def _in_local_cache(repo_id: str, revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
        return isinstance(found, str)
    except ValueError:  # not a valid repo id: let transformers say what is wrong
        return True


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def load_model(cfg: ModelConfig) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no weight-loading bars in server logs or CLI output
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    src, kwargs, name = _source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        hint = " (not found in the local cache; HF_HUB_OFFLINE is set)" if _offline() else ""
        raise ModelLoadError(f"could not load model {cfg.model or name!r}{hint}: {e}") from None
    model.to(device).eval().requires_grad_(False)
    if cfg.quantization not in QUANTIZATIONS:
        raise ModelLoadError(f"unknown quantization {cfg.quantization!r}; choose one of "
                             f"{', '.join(QUANTIZATIONS)}")  # fmt: skip
    if cfg.quantization == "int8":
        count = quantize_int8(model)
        log.info("int8 weight-only quantization: %d projections", count)
    config = model.config
    ctx = getattr(config, "max_position_embeddings", None) or 2048
    max_len = min(cfg.max_model_len or ctx, ctx)
    eos: list[int] = []
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        for t in source if isinstance(source, list | tuple) else [source]:
            if t is not None and t not in eos:
                eos.append(int(t))
    log.info("loaded %s on %s (%s%s), context %d", name, device, dtype,
             ", int8 weights" if cfg.quantization == "int8" else "", max_len)  # fmt: skip
    return LoadedModel(
        model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype,
        hidden_size=config.hidden_size, vocab_size=model.get_output_embeddings().weight.shape[0],
        max_model_len=max_len, eos_token_ids=tuple(eos), quantization=cfg.quantization,
    )  # fmt: skip


def render_chat(
    tokenizer,
    messages: list[dict],
    tools: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template: str | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> list[int]:
    """Messages → prompt token ids, with the chat template rendered exactly once.

    The template already writes BOS where the model wants one, so the text is tokenized with
    add_special_tokens=False (the authors' code added a second BOS; docs/algorithm.md §5).
    `chat_template` replaces the model's (transformers renders it in a Jinja sandbox);
    `template_kwargs` are extra variables the template reads (e.g. `enable_thinking`).
    """
    if chat_template or getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, chat_template=chat_template,
            **(template_kwargs or {}),
        )  # fmt: skip
    else:  # a base model without a template: plain "role: content" turns
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if continue_final_message:
            text = text.removesuffix("\n")
        elif add_generation_prompt:
            text += "assistant:"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
