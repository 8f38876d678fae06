"""The run directory of `mara train`: checkpoint files, the agent card, the exported agent.

Layout (OUT = --out):

  OUT/checkpoint/state.pt   networks, optimisers, α, sampler and RNG states, counters
  OUT/checkpoint/replay.pt  the replay buffer (so a resumed run continues exactly)
  OUT/agent.safetensors + OUT/agent.json   the current actor as a servable agent + its card
  OUT/train_config.json     the configuration of the latest session

Invariants: files are written to a temporary name and renamed, and `state.pt` goes last, so
its presence marks a complete checkpoint; everything is read back with `weights_only=True`
(nothing is unpickled); re-exporting an agent keeps card fields added by others
(e.g. `mara eval --update-card`).
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mara_serve.engine.agent import CARD_FILE, AgentCard, AgentNetwork, save_agent

# TrainConfig fields recorded in the card next to the SAC settings.
CARD_HYPERPARAMETERS = (
    "episodes_per_iter", "repeats", "max_new_tokens", "episode_lengths", "top_k", "top_p",
    "chunk_size", "kl_coef", "propagate", "reward_baseline", "guide_text", "guide_fraction",
    "warmup", "buffer_size", "updates_per_episode", "benign_fraction", "harm_filter",
    "max_prompt_tokens", "demonstrations", "demo_min_reward", "bc_epochs", "bc_lr", "seed",
)  # fmt: skip


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class RunDir:
    def __init__(self, out: Path):
        self.out = Path(out)
        self.checkpoint = self.out / "checkpoint"
        self.state_path = self.checkpoint / "state.pt"
        self.replay_path = self.checkpoint / "replay.pt"

    def holds_a_run(self) -> bool:
        return self.checkpoint.exists() or (self.out / "metrics.jsonl").exists()

    def write_config(self, config: dict) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "train_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def save(self, state: dict, replay_state: dict) -> None:
        self.checkpoint.mkdir(parents=True, exist_ok=True)
        _atomic_save(replay_state, self.replay_path)
        _atomic_save(state, self.state_path)  # last: it marks the checkpoint complete

    def load(self, device: torch.device) -> tuple[dict, dict | None]:
        """(state, replay state or None); raises FileNotFoundError without a checkpoint."""
        if not self.state_path.is_file():
            raise FileNotFoundError(self.state_path)
        state = torch.load(self.state_path, map_location=device, weights_only=True)
        replay = None
        if self.replay_path.is_file():
            replay = torch.load(self.replay_path, map_location=device, weights_only=True)
        return state, replay

    def export_agent(self, actor: AgentNetwork, card: AgentCard) -> Path:
        """OUT/agent.safetensors + OUT/agent.json, keeping fields others added to the card."""
        previous = self.out / CARD_FILE
        if previous.is_file():
            old = json.loads(previous.read_text())
            kept = {k: v for k, v in old.items() if k not in card.to_json()}
            card = replace(card, extra={**card.extra, **kept})
        return save_agent(actor, card, self.out)


def build_card(cfg, base_model: str, hidden_size: int, extra: dict[str, Any]) -> AgentCard:
    """The card of an agent trained with `cfg` (a TrainConfig); `extra` adds data, reward and
    training counters."""
    hyper = {k: v for k, v in cfg.sac.to_json().items() if k != "inner_dim"}
    hyper.update({k: getattr(cfg, k) for k in CARD_HYPERPARAMETERS})
    return AgentCard(
        name=cfg.name,
        hidden_size=hidden_size,
        inner_dim=cfg.sac.inner_dim,
        base_model=base_model,
        description=f"MARA agent trained with `mara train` ({_method(cfg)}) on {base_model}",
        extra={**extra, "hyperparameters": hyper, "command": cfg.command},
    )


def _method(cfg) -> str:
    if not cfg.demonstrations:
        return "discrete SAC"
    if cfg.episodes == 0:
        return "reward-filtered demonstrations, behaviour cloning"
    return "reward-filtered demonstrations, then discrete SAC"
