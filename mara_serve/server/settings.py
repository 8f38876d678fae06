"""`Settings`: the server's whole configuration, read in exactly one place.

Every field is an environment variable `MARA_<FIELD>` (e.g. `MARA_MAX_CONCURRENT`) and a flag of
`mara serve` (`--max-concurrent`); flags win over the environment. The class validates and fails
fast (a bad value stops the server before it loads anything). Nothing else in the server reads
`os.environ`; the rest of the code receives a `Settings` instance or plain values from it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from mara_serve.engine.default_model import default_cache_dir

AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(value: Any) -> Any:
    """`4GiB`, `512MiB`, `2.5GB`, `1073741824` → bytes (other types pass to validation)."""
    if not isinstance(value, str):
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    if m is None or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (e.g. 4GiB, 512MiB, 2GB or bytes)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_agent_specs(value: Any) -> dict[str, Any]:
    """`"a=/p,b=/q"` or `["a=/p", "b=/q"]` or a mapping → {name: path}."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return value
    items = value.split(",") if isinstance(value, str) else list(value)
    out: dict[str, Any] = {}
    for item in (i.strip() for i in items):
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"agent spec {item!r} must look like NAME=PATH")
        if name.strip() in out:
            raise ValueError(f"agent {name.strip()!r} is given twice")
        out[name.strip()] = path.strip()
    return out


class Settings(BaseSettings):
    """Configuration of `mara serve` (env prefix `MARA_`, same names as the CLI flags)."""

    model_config = SettingsConfigDict(
        env_prefix="MARA_", extra="forbid", frozen=True, validate_default=True
    )

    # ---- network and access ---------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0 in a container)")
    port: int = Field(8000, ge=1, le=65535, description="TCP port to listen on")
    api_key: SecretStr | None = Field(
        None, description="if set, /v1/* requires 'Authorization: Bearer <key>'"
    )
    admin_key: SecretStr | None = Field(
        None, description="if set, enables the /admin API with 'Authorization: Bearer <key>'"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="comma-separated origins allowed by CORS (browser UIs)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="log level of the server and uvicorn"
    )
    graceful_shutdown_s: float = Field(
        30.0, ge=0, description="on SIGTERM, seconds to let running requests finish"
    )

    # ---- model ----------------------------------------------------------------------------
    model: str | None = Field(
        None,
        description="HF model dir, HF model id (local cache, else downloaded from the Hub / "
        "HF_ENDPOINT), or .gguf file "
        "(default: the embedded SmolLM2-135M-Instruct)",
    )
    revision: str | None = Field(
        None, description="a Hub model's branch, tag or commit (default: main)"
    )
    served_model_name: str | None = Field(
        None, description="the base model's id in the API (default: derived from --model)"
    )
    device: str = Field("auto", description="cpu | cuda | cuda:N | auto")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights dtype (auto: bfloat16 on a CPU with native bf16 (AVX512-BF16, "
        "AMX) else float32; bfloat16/float16 on GPU)",
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        description="int8: weight-only int8 projections and LM head on a CPU (half the bytes "
        "of bf16 per decode step; pair with --dtype bfloat16), none: weights in --dtype",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="where the embedded default model is fetched to and loaded from "
        "($MARA_CACHE_DIR, else $XDG_CACHE_HOME/mara-serve, else ~/.cache/mara-serve)",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="context length cap (default: the model's own)"
    )

    # ---- agents ---------------------------------------------------------------------------
    agents: Annotated[dict[str, str | Path], NoDecode] = Field(
        default_factory=dict,
        description="agents loaded at start as NAME=PATH (flag repeatable; env 'a=/p,b=/q'); "
        "any path the operator chooses, or hf://ORG/REPO[/PATH] from the Hugging Face Hub; "
        "a name here replaces a shipped default agent",
    )
    agent_dir: Path | None = Field(
        None, description="the only directory the admin API may load agents from"
    )
    default_agents: bool = Field(
        True, description="also serve the shipped default agents with the embedded default model"
    )

    # ---- engine ---------------------------------------------------------------------------
    max_concurrent: int = Field(16, ge=1, le=1024, description="running batch size (KV slots)")
    max_waiting: int = Field(
        256, ge=1, description="queue bound; beyond it requests get 429 with Retry-After"
    )
    max_prefill_tokens: int = Field(4096, ge=1, description="prompt tokens prefilled per step")
    prefix_cache_tokens: int = Field(
        4096,
        ge=0,
        description="K/V of shared prompt prefixes (chat template, earlier turns) kept for "
        "reuse, in tokens; 0 turns prefix caching off",
    )
    batch_prefill: bool = Field(
        True,
        description="prefill the prompts admitted in one engine step in one forward (lower "
        "time to first token under load)",
    )
    kv_cache_memory: int | None = Field(
        None,
        ge=1,
        description="KV cache budget (bytes, or e.g. 4GiB, 512MiB), allocated once at start: "
        "it fixes how many requests run at once and caps max_model_len if one full-length "
        "sequence does not fit (both logged). Default: on a GPU, gpu_memory_utilization of its "
        "memory; on a CPU, every slot at full context, committed only as sequences grow",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="share of the GPU's memory the server may fill (weights + KV cache + "
        "activations) when kv_cache_memory is unset",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch runs the model with (default: one per core the process "
        "may run on, capped by a cgroup CPU quota such as docker --cpus or a Kubernetes CPU "
        "limit). In a pod without a CPU limit set it to the CPU request: torch counts the "
        "node's cores, and more spinning threads than cores stall every matmul",
    )
    cpu_split_matmuls: bool = Field(
        True,
        description="on a CPU in float32, run each projection as one batched matmul over slices "
        "of its output rows so every thread reads weights (measured +25-55 percent engine "
        "tokens/s on a 2-core AVX2 CPU, same tokens, no extra memory)",
    )
    cpu_native_decode: bool = Field(
        True,
        description="on a CPU (float32 or bfloat16, Llama-family models), run decode forwards "
        "of up to 64 tokens and the LM head on the chosen states in a C kernel compiled on "
        "first use with the machine's C compiler (one call per step instead of ~1,300 eager "
        "ops; 2-4x one-stream tokens/s measured). Without a compiler the server logs why and "
        "stays eager",
    )
    trust_request_chat_template: bool = Field(
        False,
        description="accept a request's own chat_template (a Jinja template, rendered in a "
        "sandbox but able to spend CPU); off: such a request is a 400",
    )
    enforce_eager: bool = Field(
        False,
        description="on a GPU, run every decode forward eagerly instead of replaying CUDA "
        "graphs captured per padded (rows, candidates, keys) bucket",
    )
    candidate_chunk_size: int | None = Field(
        None,
        ge=1,
        description="judge candidates m at a time; >= top_k means all in one forward "
        "(default: 4 on CPU; 8 on GPU, then all the rest in a second round)",
    )

    # ---- request limits (each violation is a 4xx, never a 500) ---------------------------
    max_request_body_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="larger request bodies get 413"
    )
    max_n: int = Field(16, ge=1, description="largest n (choices per request)")
    max_messages: int = Field(1024, ge=1, description="most messages in one chat request")
    max_prompts: int = Field(64, ge=1, description="most prompts in one /v1/completions request")
    max_stop: int = Field(16, ge=0, description="most stop strings (and stop_token_ids)")
    max_stop_length: int = Field(256, ge=1, description="longest stop string, in characters")
    max_tokens_default: int | None = Field(
        None, ge=1, description="chat max_tokens when unset (default: the remaining context)"
    )
    request_timeout_s: float | None = Field(
        None,
        gt=0,
        description="wall-clock limit of one generation request from admission, queueing "
        "included; past it the request is aborted and answered 408 request_timeout (in-band "
        "when streaming). Unset: no limit",
    )

    @field_validator("agents", mode="before")
    @classmethod
    def _parse_agents(cls, value: Any) -> dict[str, Any]:
        specs = parse_agent_specs(value)
        for name in specs:
            if not AGENT_NAME_RE.match(name):
                raise ValueError(
                    f"invalid agent name {name!r} (letters, digits, '.', '_', '-'; max 128)"
                )
        return specs

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_size(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():
            return None
        return parse_bytes(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _parse_origins(cls, value: Any) -> list[str]:
        if value is None:
            return []
        items = value.split(",") if isinstance(value, str) else list(value)
        return [o.strip() for o in items if o.strip()]

    @field_validator(
        "api_key", "admin_key", "model", "served_model_name", "request_timeout_s", mode="before"
    )
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("agent_dir")
    @classmethod
    def _agent_dir_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_dir():
            raise ValueError(f"agent directory {value} does not exist or is not a directory")
        return value

    @model_validator(mode="after")
    def _distinct_keys(self) -> Settings:
        if (
            self.api_key is not None
            and self.admin_key is not None
            and self.api_key.get_secret_value() == self.admin_key.get_secret_value()
        ):
            raise ValueError("admin_key must differ from api_key")
        return self

    @classmethod
    def unknown_env_vars(cls) -> list[str]:
        """MARA_* variables that match no setting (likely typos; `mara serve` warns)."""
        known = {f"MARA_{name.upper()}" for name in cls.model_fields}
        return sorted(k for k in os.environ if k.startswith("MARA_") and k not in known)
