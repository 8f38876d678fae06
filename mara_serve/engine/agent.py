"""MARA agents: the accept/reject network, its two checkpoint formats, and safe loading.

Network (docs/algorithm.md §3): LayerNorm(H) → Linear(H, D) → ReLU → Linear(D, D/4) → ReLU →
Linear(D/4, 2) → softmax; index 1 = accept. Parameter names match the authors' `*_actor.pth`
state dicts (`ln`, `linear1`, `linear2`, `output_linear`) so their files load unchanged.

Formats:
- the authors' `*.pth`: a plain float32 state_dict, read with `torch.load(weights_only=True)`
  (never unpickles code);
- ours: a directory holding `agent.safetensors` and `agent.json` (the card), or a
  `NAME.safetensors` file with `NAME.json` beside it.

Invariant: a loaded `Agent` is immutable (eval mode, no grad, float32); the registry swaps whole
agents, so a request that pinned one keeps exactly the weights it started with.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mara_serve.engine.errors import AgentLoadError, ModelLoadError
from mara_serve.engine.hub import HUB_AGENT_PREFIX, download_agent

ACCEPT = 1
WEIGHTS_FILE = "agent.safetensors"
CARD_FILE = "agent.json"
_KEYS = (
    "ln.weight", "ln.bias", "linear1.weight", "linear1.bias",
    "linear2.weight", "linear2.bias", "output_linear.weight", "output_linear.bias",
)  # fmt: skip


class AgentNetwork(nn.Module):
    """The actor MLP. forward(states (N, H)) → logits (N, 2)."""

    def __init__(self, hidden_size: int, inner_dim: int = 1024):
        super().__init__()
        self.ln = nn.LayerNorm(hidden_size)
        self.linear1 = nn.Linear(hidden_size, inner_dim)
        self.linear2 = nn.Linear(inner_dim, inner_dim // 4)
        self.output_linear = nn.Linear(inner_dim // 4, 2)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear1(self.ln(states)))
        x = torch.relu(self.linear2(x))
        return self.output_linear(x)


@dataclass(frozen=True)
class AgentCard:
    name: str
    hidden_size: int
    inner_dim: int = 1024
    base_model: str | None = None
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The card file: the fixed fields, then free-form ones (data, reward, metrics…)."""
        d = asdict(self)
        return {**{k: v for k, v in d.items() if k != "extra"}, **d["extra"]}


class Agent:
    """A loaded, frozen agent. `accept_probs(states)` is the only thing the decoder calls."""

    def __init__(self, network: AgentNetwork, card: AgentCard, source: str = ""):
        self.network = network.float().eval().requires_grad_(False)
        self.card = card
        self.source = source

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def hidden_size(self) -> int:
        return self.card.hidden_size

    def to(self, device: torch.device | str) -> Agent:
        self.network.to(device)
        return self

    @torch.inference_mode()
    def accept_probs(self, states: torch.Tensor) -> torch.Tensor:
        """states (N, H) → p(accept) (N,) in float32. Accept iff p > 0.5 (docs/algorithm.md §3)."""
        logits = self.network(states.float())
        return torch.softmax(logits, dim=-1)[:, ACCEPT]


def _check_state_dict(sd: Any, source: str) -> tuple[int, int]:
    if not isinstance(sd, dict):
        raise AgentLoadError(f"{source}: not an agent state_dict (got {type(sd).__name__})")
    keys = set(sd)
    if keys != set(_KEYS):
        missing, unexpected = sorted(set(_KEYS) - keys), sorted(keys - set(_KEYS))
        raise AgentLoadError(
            f"{source}: not a MARA agent (missing keys {missing}, unexpected keys {unexpected})"
        )
    for k in _KEYS:
        t = sd[k]
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise AgentLoadError(f"{source}: {k} is not a floating-point tensor")
        if not bool(torch.isfinite(t).all()):
            raise AgentLoadError(f"{source}: {k} contains NaN or inf")
    H, D = sd["ln.weight"].shape[0], sd["linear1.weight"].shape[0]
    expected = {
        "ln.weight": (H,), "ln.bias": (H,), "linear1.weight": (D, H), "linear1.bias": (D,),
        "linear2.weight": (D // 4, D), "linear2.bias": (D // 4,),
        "output_linear.weight": (2, D // 4), "output_linear.bias": (2,),
    }  # fmt: skip
    for k, shape in expected.items():
        if tuple(sd[k].shape) != shape:
            raise AgentLoadError(f"{source}: {k} has shape {tuple(sd[k].shape)}, expected {shape}")
    return H, D


def _read_pth(path: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise AgentLoadError(
                f"{path.name}: refused: the file contains objects other than tensors "
                "(only weights-only state_dicts are loaded; nothing in it was executed)"
            ) from None
        raise AgentLoadError(f"{path.name}: corrupt or truncated agent file: "
                             f"{str(e).splitlines()[0][:200]}") from None  # fmt: skip
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise AgentLoadError(f"{path.name}: corrupt or truncated agent file: {e}") from None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise AgentLoadError(f"{path.name}: corrupt or truncated agent file: {e}") from None


def _read_card(path: Path) -> dict[str, Any]:
    try:
        card = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AgentLoadError(f"{path.name}: unreadable agent card: {e}") from None
    if not isinstance(card, dict):
        raise AgentLoadError(f"{path.name}: agent card must be a JSON object")
    return card


def load_agent(
    path: str | Path,
    *,
    name: str | None = None,
    expected_hidden_size: int | None = None,
    device: torch.device | str = "cpu",
) -> Agent:
    """Load an agent from a `.pth` (authors), a `.safetensors` file, or an agent directory.

    `hf://ORG/REPO[/PATH]` is downloaded from the Hugging Face Hub first (engine/hub.py).
    Raises AgentLoadError with a clear message for anything that is not a valid agent, and
    when `expected_hidden_size` (the base model's) differs from the agent's.
    """
    if isinstance(path, str) and path.startswith(HUB_AGENT_PREFIX):
        try:
            path = download_agent(path)
        except ModelLoadError as e:
            raise AgentLoadError(str(e)) from None
    path = Path(path)
    if not path.exists():
        raise AgentLoadError(f"agent file not found: {path}")
    card_data: dict[str, Any] = {}
    if path.is_dir():
        weights, card_path = path / WEIGHTS_FILE, path / CARD_FILE
        if not weights.is_file():
            raise AgentLoadError(f"{path}: agent directory has no {WEIGHTS_FILE}")
        sd = _read_safetensors(weights)
        if card_path.is_file():
            card_data = _read_card(card_path)
    elif path.suffix == ".safetensors":
        sd = _read_safetensors(path)
        if path.with_suffix(".json").is_file():
            card_data = _read_card(path.with_suffix(".json"))
    elif path.suffix in (".pth", ".pt", ".bin"):
        sd = _read_pth(path)
    else:
        raise AgentLoadError(f"{path.name}: unknown agent format (use .pth, .safetensors or a dir)")
    H, D = _check_state_dict(sd, path.name)
    if card_data.get("hidden_size") not in (None, H):
        raise AgentLoadError(
            f"{path.name}: card says hidden_size {card_data['hidden_size']}, weights have {H}"
        )
    if expected_hidden_size is not None and H != expected_hidden_size:
        raise AgentLoadError(
            f"{path.name}: agent hidden size {H} does not match the base model's hidden size "
            f"{expected_hidden_size}; an agent only works with the model family it was trained on"
        )
    network = AgentNetwork(H, D)
    network.load_state_dict({k: v.float() for k, v in sd.items()})
    card = AgentCard(
        name=name or card_data.get("name") or path.stem.removesuffix("_actor"),
        hidden_size=H,
        inner_dim=D,
        base_model=card_data.get("base_model"),
        description=card_data.get("description", ""),
        extra={
            k: v
            for k, v in card_data.items()
            if k not in ("name", "hidden_size", "inner_dim", "base_model", "description")
        },
    )
    return Agent(network, card, source=str(path)).to(device)


def save_agent(network: AgentNetwork, card: AgentCard, out_dir: str | Path) -> Path:
    """Write an agent in our format: OUT/agent.safetensors + OUT/agent.json."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().float().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(sd, str(out / WEIGHTS_FILE))
    (out / CARD_FILE).write_text(json.dumps(card.to_json(), indent=2) + "\n")
    for f in (out / WEIGHTS_FILE, out / CARD_FILE):  # safetensors writes 0600; agents are shared
        f.chmod(0o644)
    return out
