"""Discrete soft actor-critic for the accept/reject agent (docs/algorithm.md §6).

- Actor: the agent network itself (`AgentNetwork`, index 1 = accept), so the trained weights
  save straight into the agent format.
- Critic: twin Q networks with the actor's body, each mapping a state to (Q(reject),
  Q(accept)), plus target copies updated softly with τ after every gradient step.
- Temperature α learned through log α toward the target entropy `ratio · ln 2`.

One `update` (shapes: B batch, H hidden):
  target  y = r + γ (1 − done) Σ_a π(a|s') [min(Q̄1, Q̄2)(s', a) − α log π(a|s')]
  critic  ½ MSE(Q1(s, a), y) + ½ MSE(Q2(s, a), y)
  actor   Σ_a π(a|s) [α log π(a|s) − min(Q1, Q2)(s, a)]        (expectation over both actions)
  alpha   log α · (H(π(·|s)) − H_target)                         (H above target → α falls)
each with its own Adam optimiser (lr 3e-4) and gradient-norm clipping at 0.5, as in the paper.
The authors update targets once per `update_time` batch of steps and take α's gradient through
exp(log α); we use the usual per-step soft update and log α (same fixed points).
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mara_serve.engine.agent import AgentNetwork


@dataclass(frozen=True)
class SACConfig:
    gamma: float = 0.99
    tau: float = 0.005
    batch_size: int = 1024
    lr_actor: float = 3e-4
    lr_critic: float = 3e-4
    lr_alpha: float = 3e-4
    alpha: float = 0.01  # initial temperature
    target_entropy_ratio: float = 0.6  # × ln 2, the entropy of a fair accept/reject coin
    grad_clip: float = 0.5
    inner_dim: int = 1024
    init_accept_prob: float | None = None  # None: the paper's plain initialisation

    def to_json(self) -> dict:
        return asdict(self)


def bias_toward_accept(actor: AgentNetwork, p: float) -> None:
    """Start the actor near p(accept) = p for every state (output bias gap logit(p)), so early
    episodes read like the base model's own sampling instead of a random walk over ranks."""
    if not 0.0 < p < 1.0:
        raise ValueError("init_accept_prob must be in (0, 1)")
    with torch.no_grad():
        actor.output_linear.bias.copy_(torch.tensor([0.0, math.log(p / (1.0 - p))]))


class TwinCritic(nn.Module):
    """Two independent Q networks with the actor's body: states (B, H) → two (B, 2)."""

    def __init__(self, hidden_size: int, inner_dim: int):
        super().__init__()
        self.q1 = AgentNetwork(hidden_size, inner_dim)
        self.q2 = AgentNetwork(hidden_size, inner_dim)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q1(states), self.q2(states)


def _policy(actor: nn.Module, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(probs, log probs), each (B, 2); log-softmax keeps log π finite at saturation."""
    logp = F.log_softmax(actor(states), dim=-1)
    return logp.exp(), logp


class DiscreteSAC:
    def __init__(self, hidden_size: int, config: SACConfig | None = None, device="cpu"):
        config = config or SACConfig()
        self.config, self.device = config, torch.device(device)
        self.actor = AgentNetwork(hidden_size, config.inner_dim).to(self.device)
        if config.init_accept_prob is not None:
            bias_toward_accept(self.actor, config.init_accept_prob)
        self.critic = TwinCritic(hidden_size, config.inner_dim).to(self.device)
        self.target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = torch.tensor(
            math.log(config.alpha), device=self.device, requires_grad=True
        )
        self.target_entropy = config.target_entropy_ratio * math.log(2.0)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=config.lr_actor)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr_critic)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=config.lr_alpha)
        self.updates = 0

    @property
    def alpha(self) -> float:
        return self.log_alpha.detach().exp().item()

    def update(self, states, actions, rewards, next_states, dones) -> dict[str, float]:
        """One gradient step of critic, actor and temperature on a batch; returns losses."""
        cfg = self.config
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_p, next_logp = _policy(self.actor, next_states)
            q1_t, q2_t = self.target(next_states)
            v_next = (next_p * (torch.min(q1_t, q2_t) - alpha * next_logp)).sum(-1)  # (B,)
            y = rewards + cfg.gamma * (~dones).float() * v_next

        q1, q2 = self.critic(states)
        a = actions[:, None]
        q1_a, q2_a = q1.gather(1, a).squeeze(1), q2.gather(1, a).squeeze(1)
        critic_loss = 0.5 * F.mse_loss(q1_a, y) + 0.5 * F.mse_loss(q2_a, y)
        self._step(self.critic_opt, critic_loss, self.critic.parameters())

        p, logp = _policy(self.actor, states)
        with torch.no_grad():
            q_min = torch.min(*self.critic(states))  # (B, 2), critic frozen for the actor
        actor_loss = (p * (alpha * logp - q_min)).sum(-1).mean()
        self._step(self.actor_opt, actor_loss, self.actor.parameters())

        entropy = -(p.detach() * logp.detach()).sum(-1).mean()
        alpha_loss = self.log_alpha * (entropy - self.target_entropy)
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        self._soft_update()
        self.updates += 1
        return {
            "critic_loss": critic_loss.item(),
            "actor_loss": actor_loss.item(),
            "alpha_loss": alpha_loss.item(),
            "alpha": self.alpha,
            "entropy": entropy.item(),
            "q_mean": 0.5 * (q1_a + q2_a).mean().item(),
            "p_accept": p[:, 1].mean().item(),
        }

    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor, params) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(params, self.config.grad_clip)
        opt.step()

    @torch.no_grad()
    def _soft_update(self) -> None:
        tau = self.config.tau
        for t, s in zip(self.target.parameters(), self.critic.parameters(), strict=True):
            t.lerp_(s, tau)

    def state_dict(self) -> dict:
        return {
            "actor": self.actor.state_dict(),
            "critic": self.critic.state_dict(),
            "target": self.target.state_dict(),
            "log_alpha": self.log_alpha.detach().clone(),
            "actor_opt": self.actor_opt.state_dict(),
            "critic_opt": self.critic_opt.state_dict(),
            "alpha_opt": self.alpha_opt.state_dict(),
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        self.alpha_opt.load_state_dict(state["alpha_opt"])
        self.updates = int(state["updates"])
