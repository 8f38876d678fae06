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


def _fetch(repo: str, name: str, what: str, required: bool = True,
           revision: str | None = None) -> Path | None:  # fmt: skip
    """One file of `repo` in the local HF cache (downloaded if needed); None when it does not
    exist and is not `required`. `what` names the thing being loaded in errors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo, name, revision=revision))
    except EntryNotFoundError:
        if required:
            raise ModelLoadError(f"{what}: {repo} has no {name}") from None
        return None
    except RepositoryNotFoundError:
        raise ModelLoadError(
            f"{what}: repository {repo!r} not found on the hub (or it is gated: set HF_TOKEN)"
        ) from None
    except (HfHubHTTPError, OSError) as e:
        raise ModelLoadError(f"{what}: could not download {name}: {e}") from None


def download_model(repo_id: str, revision: str | None = None) -> Path:
    """The local directory holding `repo_id`'s loadable files (downloaded if needed)."""
    what = f"model {repo_id!r}"

    def fetch(name: str, required: bool) -> Path | None:
        return _fetch(repo_id, name, what, required, revision)

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
            f"{what} has no safetensors weights ({WEIGHTS} or {WEIGHTS_INDEX}); "
            "pickled .bin weights are not loaded"
        )
    return config.parent  # type: ignore[union-attr]


HUB_AGENT_PREFIX = "hf://"


def download_agent(spec: str) -> Path:
    """`hf://ORG/REPO[/PATH]` → the local path of that agent: a `.pth` or `.safetensors` file
    (with its `.json` card when there is one), else the directory PATH (repo root without
    one) holding `agent.safetensors` and `agent.json`."""
    parts = spec.removeprefix(HUB_AGENT_PREFIX).strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise ModelLoadError(f"agent {spec!r}: expected hf://ORG/REPO[/PATH]")
    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    what = f"agent {spec!r}"
    if sub.endswith((".pth", ".pt")):
        return _fetch(repo, sub, what)  # type: ignore[return-value]
    if sub.endswith(".safetensors"):
        _fetch(repo, sub.removesuffix(".safetensors") + ".json", what, required=False)
        return _fetch(repo, sub, what)  # type: ignore[return-value]
    prefix = f"{sub}/" if sub else ""
    weights = _fetch(repo, prefix + "agent.safetensors", what)
    _fetch(repo, prefix + "agent.json", what, required=False)
    return weights.parent  # type: ignore[union-attr]
