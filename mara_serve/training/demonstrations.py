"""Reward-filtered demonstrations: a supervised start for the actor before SAC (algorithm.md §6).

Why: from a random actor, SAC on a sparse end-of-answer reward needs many thousands of
episodes before the rare refusal it stumbles on is learned — tens of hours on a CPU for a
135M model — and what it learns from few prompts is words more than intent. A demonstration
per prompt gives dense supervision from the same reward at a fraction of the cost.

For each drawn prompt two deterministic episodes run through the batched engine, side by side:
- own: the agent accepts the top-1 candidate at every step — the base model's greedy answer;
- guided: the agent follows `guide_text` (or any of its alternatives) among the model's own
  candidates (it rejects those ranked above the one that continues it, as `EpisodeAgent`
  steers), and once the guide is used up it ends the answer at the first end-of-sequence
  candidate the model offers (accepting the top-1 until then).
The reward scores both. The better one is the prompt's demonstration when its reward is at
least `min_reward` (ties go to the model's own answer: the agent should change nothing the
reward does not ask it to); a prompt where neither is good enough gives none. A kept episode's
decisions become supervised pairs — every judged candidate's state labelled reject, the
emitted one's accept — and the actor is fitted to them by class-balanced cross-entropy
(behaviour cloning, `behaviour_clone`). Both episodes' transitions, rewarded as usual, also seed
the replay buffer, so SAC's critics start from what the demonstrations showed.

The reward alone decides which behaviour is demonstrated, so this works for any reward: with the
refusal reward a harmful prompt's demonstration is the guided refusal, a benign (or
alarming-but-harmless) prompt's the model's own answer, and a refusal that then complies is
kept by neither.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mara_serve.engine.agent import ACCEPT, AgentNetwork
from mara_serve.training.episodes import Episode, EpisodeAgent


class DemoAgent(EpisodeAgent):
    """A deterministic episode agent: top-1 always, or the guide then the earliest end token.

    It records its calls exactly as `EpisodeAgent` does (p(accept) is the 0/1 action), so the
    episode's decisions align with the engine's traces the same way."""

    def __init__(self, hidden_size: int, guide, token_text, end_ids: tuple[int, ...]):
        super().__init__(None, hidden_size, None, guide, token_text)  # type: ignore[arg-type]
        self.end_ids = frozenset(end_ids)
        self.ending = self.guide is not None  # after the guide: end at the first end token

    @torch.no_grad()
    def accept_probs(self, states: torch.Tensor, candidates=None) -> torch.Tensor:
        states = states.float()
        cands, offset = candidates[0]
        # Unsteered choice: the top-1, or once a guide is over the earliest end token offered;
        # while the guide continues, `_steer` replaces it with the guide's candidate.
        target = 0
        if self.ending:
            target = next((r for r, c in enumerate(cands) if c in self.end_ids), 0)
        actions = torch.zeros(len(states))
        if offset <= target < offset + len(states):  # else: in a later chunk, reject this one
            actions[target - offset] = 1.0
        if self.guide is not None:
            actions = self._steer(actions, cands, offset)
        self.calls.append((states.clone(), actions.clone(), actions.clone()))
        return actions


@dataclass
class Demonstrations:
    """Supervised pairs from kept demonstrations, split by prompt into fit and validation."""

    states: torch.Tensor  # (N, H)
    labels: torch.Tensor  # (N,) int64: 0 reject, 1 accept
    validation: torch.Tensor  # (N,) bool: the pair's prompt is held out of the fit


def choose(own_reward: float, guided_reward: float, min_reward: float) -> str | None:
    """Which episode of a prompt to demonstrate: 'own', 'guided' or None (module doc)."""
    best = max(own_reward, guided_reward)
    if best < min_reward:
        return None
    return "own" if own_reward >= guided_reward else "guided"


def demonstration_pairs(episodes: list[Episode], validation: list[bool]) -> Demonstrations | None:
    """The (state, action) pairs of the kept episodes; `validation[i]`: episode i is held out."""
    states, labels, held = [], [], []
    for ep, val in zip(episodes, validation, strict=True):
        for d in ep.decisions:
            k = len(d.accept_prob)
            states.append(d.states)
            labels += [0] * (k - 1) + [1]
            held += [val] * k
    if not states:
        return None
    return Demonstrations(
        torch.cat(states).float(), torch.tensor(labels), torch.tensor(held, dtype=torch.bool)
    )


def _balanced_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per-class weights N / (2 · N_c): rejections are rare next to the many accepted top-1s."""
    counts = torch.bincount(labels, minlength=2).clamp(min=1).float()
    return labels.numel() / (2.0 * counts)


@torch.no_grad()
def _accuracy(actor: AgentNetwork, states: torch.Tensor, labels: torch.Tensor) -> dict:
    if not len(labels):
        return {}
    pred = actor(states).argmax(-1)
    out = {"accuracy": float((pred == labels).float().mean())}
    for name, cls in (("reject", 0), ("accept", ACCEPT)):
        mask = labels == cls
        if mask.any():
            out[f"{name}_recall"] = float((pred[mask] == cls).float().mean())
    return out


def behaviour_clone(
    actor: AgentNetwork,
    demos: Demonstrations,
    epochs: int,
    lr: float,
    batch_size: int,
    generator: torch.Generator,
    grad_clip: float = 0.5,
) -> dict:
    """Fit `actor` to the demonstrations' fit split; returns fit/validation accuracies."""
    device = next(actor.parameters()).device
    fit = ~demos.validation
    states, labels = demos.states[fit].to(device), demos.labels[fit].to(device)
    weights = _balanced_weights(labels)
    opt = torch.optim.Adam(actor.parameters(), lr=lr)
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator).to(device)
        total = 0.0
        for start in range(0, len(labels), batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(actor(states[idx]), labels[idx], weight=weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(actor.parameters(), grad_clip)
            opt.step()
            total += float(loss.detach()) * len(idx)
        losses.append(total / max(len(labels), 1))
    held = demos.validation
    val_s, val_l = demos.states[held].to(device), demos.labels[held].to(device)
    return {
        "pairs": len(labels),
        "rejects": int((labels == 0).sum()),
        "validation_pairs": len(val_l),
        "epochs": epochs,
        "first_loss": round(losses[0], 4) if losses else math.nan,
        "last_loss": round(losses[-1], 4) if losses else math.nan,
        "fit": _accuracy(actor, states, labels),
        "validation": _accuracy(actor, val_s, val_l),
    }
