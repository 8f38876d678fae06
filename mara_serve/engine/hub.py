"""Downloading a model from the Hugging Face Hub (or a mirror: `HF_ENDPOINT`) into the local HF
cache, for `--model ORG/NAME` when the cache does not have it yet; and agents given as
`hf://ORG/REPO[/PATH]` (a `.pth` / `.safetensors` file, or an agent directory).

Only what loading needs is fetched, file by file (`hf_hub_download`: resumable, cached, the
usual `HF_TOKEN` / `HF_HOME` / `HF_ENDPOINT` / `HF_HUB_OFFLINE` environment): the config and
generation config, the tokenizer files that exist, and the safetensors weights (one file, or
the shards a `model.safetensors.index.json` lists). Pickled `*.bin` weights are never fetched:
loading them can run code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mara_serve.engine.errors import ModelLoadError

log = logging.getLogger(__name__)

REQUIRED = ("config.json",)
OPTIONAL = (
    "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)  # fmt: skip
WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """The local directory holding `repo_id`'s loadable files (downloaded if needed)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    def fetch(name: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, name, revision=revision))
        except EntryNotFoundError:
            if required:
                raise ModelLoadError(f"model {repo_id!r} has no {name}") from None
            return None
        except RepositoryNotFoundError:
            raise ModelLoadError(
                f"model {repo_id!r} not found on the hub (or it is gated: set HF_TOKEN)"
            ) from None
        except (HfHubHTTPError, OSError) as e:
            raise ModelLoadError(f"could not download {name} of {repo_id!r}: {e}") from None

    log.info("fetching %s from the hub (once; then from the local cache)", repo_id)
    config = fetch("config.json", True)
    for name in OPTIONAL:
        fetch(name, False)
    index = fetch(WEIGHTS_INDEX, False)
    if index is not None:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        for shard in shards:
            fetch(shard, True)
    elif fetch(WEIGHTS, False) is None:
        raise ModelLoadError(
            f"model {repo_id!r} has no safetensors weights ({WEIGHTS} or {WEIGHTS_INDEX}); "
            "pickled .bin weights are not loaded"
        )
    return config.parent


HUB_AGENT_PREFIX = "hf://"


def download_agent(spec: str) -> Path:
    """`hf://ORG/REPO[/PATH]` → the local path of that agent: a `.pth` or `.safetensors` file
    (with its `.json` card when there is one), else the directory PATH (repo root without
    one) holding `agent.safetensors` and `agent.json`."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    parts = spec.removeprefix(HUB_AGENT_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelLoadError(f"agent {spec!r}: expected hf://ORG/REPO[/PATH]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])

    def fetch(name: str, required: bool = True) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name))
        except EntryNotFoundError:
            if required:
                raise ModelLoadError(f"agent {spec!r}: {repo} has no {name}") from None
            return None
        except RepositoryNotFoundError:
            raise ModelLoadError(f"agent {spec!r}: repository {repo!r} not found") from None
        except (HfHubHTTPError, OSError) as e:
            raise ModelLoadError(f"agent {spec!r}: could not download {name}: {e}") from None

    if sub.endswith((".pth", ".pt")):
        return fetch(sub)  # type: ignore[return-value]
    if sub.endswith(".safetensors"):
        fetch(sub.removesuffix(".safetensors") + ".json", required=False)
        return fetch(sub)  # type: ignore[return-value]
    prefix = f"{sub}/" if sub else ""
    weights = fetch(prefix + "agent.safetensors")
    fetch(prefix + "agent.json", required=False)
    return weights.parent  # type: ignore[union-attr]
