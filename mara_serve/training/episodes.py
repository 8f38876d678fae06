"""Training episodes through the batched engine, and their SAC transitions (docs/algorithm.md §6).

One episode = one response to one training prompt. Episodes run as ordinary requests of
`LLMEngine` (many at once, one forward per step for all their candidates), each with its own
`EpisodeAgent`: a wrapper around the shared actor that *samples* accept ~ Bernoulli(p_accept)
and answers 1.0/0.0, so the engine's `> 0.5` threshold applies the sampled action. Its
`fallback_last = True` makes "all rejected" emit the last candidate (the authors' training-time
rule). The engine groups agent calls by agent object, so each call of a wrapper holds the
candidates of its own row only; the wrapper records every call (states, p_accept, actions).

Aligning calls with traces: for each emitted token with more than one candidate, the engine
judged candidates in order up to the first accept (`TokenTrace.evaluated`). It made one agent
call per token (or several in chunked mode, one per chunk); the calls are consumed in order
until they cover the judged candidates. Recorded states past the first accept belong to no
decision and are dropped.

Transitions of one decision (token t, judged ranks 0..k): rank i < k is (s_i, reject, s_{i+1});
rank k is (s_k, accept, first state of the next decision) — on fallback the last candidate is a
forced accept, as in the authors' code. Each transition of decision t (D decisions) gets
  kl_coef · (log π_llm(c*) − log π_llm(c_0))  +  γ^(D−1−t) · R   (the second with `propagate`)
- shaping: the log-probability the emitted token c* gives up against the model's top-1 c_0
  (π_llm: the renormalised top-k probabilities, `TokenTrace.llm_probs`), ≤ 0, paid by every
  rejection that led there and by the accept. Accepting the top-1 — the base model's own
  greedy choice, which MARA's greedy-accept inference falls back to — costs nothing; a chain
  of rejections ending on an unlikely token costs the most, and at once: with the cost on the
  accept only, a critic that does not know the future yet sees rejecting as free (we measured
  agents collapsing into rejecting everything within a few hundred updates).
  The paper's shaping is −kl_coef · KL(agent ‖ LLM); its sample estimate
  log π_agent(c*) − log π_llm(c*) splits into −log π_agent(c*), an entropy bonus SAC already
  has (with a learned temperature), and log π_llm(c*), a fluency term. We keep the fluency
  term, offset so that the top-1 costs nothing: pulling a stochastic agent toward the model's
  *sampling* distribution instead teaches it to reject any top-1 below probability 0.5, which
  greedy inference turns into needless rejections. (The authors' code also feeds
  probabilities as logits to a log-softmax and compares with temperature-scaled, unnormalised
  model log-probs; we do not reproduce those quirks.)
- outcome: with `propagate` (the authors' `postback_reward`), the terminal reward discounted
  per token on every transition, rejections included — a dense Monte-Carlo signal for the
  early tokens where a refusal is decided; without it, R on the last transition only. As in
  the authors' code each extra rejection adds another copy of R, so R > 0 rewards rejecting
  and R < 0 punishes it; with the per-prompt baseline (trainer.py) R is centred on the
  agent's own episodes, so most episodes carry R ≈ 0 and this bias stays where the outcome
  differs from the agent's usual answer.
The last transition of an episode is terminal. Because an episode's transitions are stored
contiguously, the next state of transition m is the state of transition m+1 (see replay.py).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mara_serve.engine.agent import ACCEPT, AgentNetwork
from mara_serve.engine.engine import LLMEngine
from mara_serve.engine.request import Request, TokenTrace
from mara_serve.engine.sampling import SamplingParams
from mara_serve.training.data import Prompt

log = logging.getLogger(__name__)
_EPS = 1e-6


class EpisodeAgent:
    """Stochastic per-episode view of the shared actor (see the module doc).

    With a `guide` text (or several alternative texts) the episode is steered toward that
    opening (guided exploration): while the guide lasts, the agent rejects candidates until the
    first one whose text continues an alternative and accepts it; once no candidate continues
    any (or one is used up), the agent samples from the actor as usual. The steering only ever
    picks among the model's own candidates, so a guided answer is one the agent could learn to
    produce; SAC learns off-policy from it, and the reward alone says whether it was good (a
    refusal guide on a benign prompt is penalised as over-refusal).
    """

    fallback_last = True  # training-time rule: all rejected → the LAST candidate
    sees_candidates = True  # the engine passes each call's candidate tokens (for the guide)
    GUIDE_SLACK = 2  # characters a match may skip (a token the engine emitted unasked)

    def __init__(
        self,
        network: AgentNetwork,
        hidden_size: int,
        generator: torch.Generator,
        guide: str | Sequence[str] | None = None,
        token_text: Callable[[int], str] | None = None,
    ):
        self.network, self.hidden_size, self.generator = network, hidden_size, generator
        self.name = "mara-train-episode"
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        texts = [guide] if isinstance(guide, str) else list(guide or ())
        # what is left of each alternative guide text still consistent with the answer
        self.guide: list[str] | None = [t for t in texts if t] or None
        self.token_text = token_text
        self.guided_tokens = 0

    @torch.no_grad()
    def accept_probs(self, states: torch.Tensor, candidates=None) -> torch.Tensor:
        """states (N, H) → actions (N,) as 1.0 (accept) / 0.0 (reject); `candidates`: one
        (full candidate list, rank of the first state) per row — one row per episode agent."""
        states = states.float()
        p = torch.softmax(self.network(states), dim=-1)[:, ACCEPT]  # (N,)
        actions = torch.bernoulli(p, generator=self.generator)
        if self.guide is not None and candidates:
            actions = self._steer(actions, *candidates[0])
        self.calls.append((states.clone(), p.clone(), actions.clone()))
        return actions

    def _steer(self, actions: torch.Tensor, cands: list[int], offset: int) -> torch.Tensor:
        match = self._match(cands)
        if match is None:  # the model offers no way on: the guide ends here
            self.guide = None
            return actions
        rank, rest = match
        steered = torch.zeros_like(actions)
        if offset <= rank < offset + len(actions):  # else: in a later chunk, reject this one
            steered[rank - offset] = 1.0
            self._advance(rest)
        return steered

    def _advance(self, rest: list[str]) -> None:
        """The matched candidate was emitted: keep the alternatives it continued, what is left
        of each; the guide is done once one of them is used up."""
        self.guide = None if not all(rest) else rest
        self.guided_tokens += 1

    def _match(self, cands: list[int]) -> tuple[int, list[str]] | None:
        """(rank, what is left of each alternative it continues) of the best candidate: the
        most probable one that continues an alternative up to a word boundary (" sorry", not
        " so", when both are offered), else the most probable one that continues one, else one
        that continues one within GUIDE_SLACK characters."""
        exact: list[tuple[int, list[str]]] = []
        near = None
        for rank, c in enumerate(cands):
            text = self.token_text(c) if self.token_text else ""
            if not text.strip():
                continue
            rest, rest_near = [], []
            for g in self.guide or ():
                pos = g.find(text)
                if pos == 0:
                    rest.append(g[len(text) :])
                elif 0 < pos <= self.GUIDE_SLACK:
                    rest_near.append(g[pos + len(text) :])
            if rest:
                if any(not r or not r[0].isalnum() for r in rest):
                    return rank, rest  # whole words: the best there is
                exact.append((rank, rest))
            elif rest_near and near is None:
                near = (rank, rest_near)
        return exact[0] if exact else near


@dataclass
class Decision:
    """The agent's decisions for one emitted token."""

    states: torch.Tensor  # (k+1, H) judged candidates' states, in rank order
    accept_prob: torch.Tensor  # (k+1,) the actor's p(accept) when the episode ran
    fallback: bool
    agent_logprob: float  # log π_agent(emitted token)
    llm_prob: float  # π_llm(emitted token), renormalised over the top-k
    llm_top_prob: float  # π_llm(top-1 candidate)

    @property
    def logprob_regret(self) -> float:
        """log π_llm(top-1) − log π_llm(emitted) ≥ 0: what the agent's choice gave up."""
        return math.log(max(self.llm_top_prob, _EPS)) - math.log(max(self.llm_prob, _EPS))


@dataclass
class Episode:
    prompt: Prompt
    token_ids: list[int]
    response: str
    finish_reason: str
    decisions: list[Decision] = field(default_factory=list)
    guided_tokens: int = 0  # tokens a guide chose (0: the agent's own episode)

    @property
    def judged(self) -> int:
        return sum(len(d.accept_prob) for d in self.decisions)

    @property
    def rejected(self) -> int:
        return sum(len(d.accept_prob) - (0 if d.fallback else 1) for d in self.decisions)

    @property
    def fallbacks(self) -> int:
        return sum(d.fallback for d in self.decisions)


class AlignmentError(RuntimeError):
    """The recorded agent calls do not match the engine's traces (should never happen)."""


def _agent_logprob(p: torch.Tensor, rank: int, num_candidates: int) -> float:
    """log π_agent(c_rank) for the sampling agent with the fallback-to-last rule."""
    p = p.double().clamp(_EPS, 1 - _EPS)
    log_reject = torch.log1p(-p[:rank]).sum()
    if rank == num_candidates - 1:  # the last candidate also takes the all-rejected mass
        return float(log_reject)
    return float(log_reject + torch.log(p[rank]))


def align_decisions(traces: list[TokenTrace], calls: list) -> list[Decision]:
    """Pair each judged token's trace with the agent calls that judged it (module doc)."""
    pending = iter(calls)
    out = []
    for t in traces:
        if t.num_candidates <= 1:
            continue
        states, probs, acts, n = [], [], [], 0
        while n < t.evaluated:
            try:
                s, p, a = next(pending)
            except StopIteration:
                raise AlignmentError("fewer agent calls than judged candidates") from None
            states.append(s), probs.append(p), acts.append(a)
            n += len(p)
        k = t.evaluated
        s, p, a = torch.cat(states)[:k], torch.cat(probs)[:k], torch.cat(acts)[:k]
        if bool(a[:-1].any()) or bool(a[-1]) == t.fallback:
            raise AlignmentError(f"sampled actions {a.tolist()} disagree with trace {t}")
        out.append(
            Decision(
                states=s,
                accept_prob=p,
                fallback=t.fallback,
                agent_logprob=_agent_logprob(p, t.accepted_rank, t.num_candidates),
                llm_prob=float(t.llm_probs[-1]) if t.llm_probs else 1.0,
                llm_top_prob=float(t.llm_probs[0]) if t.llm_probs else 1.0,
            )
        )
    return out


def collect_episodes(
    engine: LLMEngine,
    actor: AgentNetwork,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    generator: torch.Generator,
    decode: Callable[[list[int]], str],
    guides: list[str | Sequence[str] | None] | None = None,
) -> list[Episode]:
    """Run one stochastic episode per prompt, all batched in `engine`. `params`: one for all
    or one per episode (mixed lengths); `decode(ids) -> str`; `guides`: an optional guide
    text per episode (EpisodeAgent)."""
    guides = guides or [None] * len(prompts)
    token_text = token_texts(decode)
    agents = [EpisodeAgent(actor, engine.lm.hidden_size, generator, g, token_text) for g in guides]
    episodes = run_episodes(engine, prompts, prompt_ids, params, agents, decode)
    return [e for e in episodes if e is not None]


def token_texts(decode: Callable[[list[int]], str]) -> Callable[[int], str]:
    """A memoised one-token decoder for the agents' guide matching."""
    texts: dict[int, str] = {}

    def token_text(t: int) -> str:
        if t not in texts:
            texts[t] = decode([t])
        return texts[t]

    return token_text


def run_episodes(
    engine: LLMEngine,
    prompts: list[Prompt],
    prompt_ids: list[list[int]],
    params: SamplingParams | list[SamplingParams],
    agents: list[EpisodeAgent],
    decode: Callable[[list[int]], str],
) -> list[Episode | None]:
    """One episode per (prompt, agent), all batched in `engine`, in order; None where the
    engine failed the episode or its agent calls do not match its traces (logged)."""
    per_episode = params if isinstance(params, list) else [params] * len(prompts)
    requests = [
        Request(f"episode-{i}", ids, sp, agent)  # type: ignore[arg-type]
        for i, (ids, agent, sp) in enumerate(zip(prompt_ids, agents, per_episode, strict=True))
    ]
    results = engine.generate(requests)
    episodes: list[Episode | None] = []
    for prompt, request, agent in zip(prompts, requests, agents, strict=True):
        ids, traces, reason = results[request.request_id]
        if reason == "error":
            log.warning("episode for %r failed in the engine; skipped", prompt.text[:60])
            episodes.append(None)
            continue
        try:
            decisions = align_decisions(traces, agent.calls)
        except AlignmentError as e:
            log.warning("episode for %r skipped: %s", prompt.text[:60], e)
            episodes.append(None)
            continue
        episodes.append(Episode(prompt, ids, decode(ids), reason, decisions, agent.guided_tokens))
    return episodes


@dataclass
class Transitions:
    """A block of consecutive transitions (one or more whole episodes)."""

    states: torch.Tensor  # (M, H)
    actions: torch.Tensor  # (M,) int64: 0 reject, 1 accept
    rewards: torch.Tensor  # (M,) float32
    dones: torch.Tensor  # (M,) bool: the episode ends after this transition

    def __len__(self) -> int:
        return int(self.actions.numel())


def episode_transitions(
    ep: Episode, terminal_reward: float, kl_coef: float, gamma: float, propagate: bool
) -> Transitions | None:
    """The transitions of one episode (module doc); None when the agent decided nothing."""
    D = len(ep.decisions)
    if D == 0:
        return None
    states, actions, rewards = [], [], []
    for t, d in enumerate(ep.decisions):
        k = len(d.accept_prob)
        shaping = -kl_coef * d.logprob_regret
        outcome = gamma ** (D - 1 - t) * terminal_reward if propagate or t == D - 1 else 0.0
        if propagate:
            rewards_t = [shaping + outcome] * k
        else:  # R on the last transition only
            rewards_t = [shaping] * (k - 1) + [shaping + outcome]
        states.append(d.states)
        actions += [0] * (k - 1) + [1]  # rejects, then the accept (forced on fallback)
        rewards += rewards_t
    M = len(actions)
    dones = torch.zeros(M, dtype=torch.bool)
    dones[-1] = True
    return Transitions(
        torch.cat(states).float(),
        torch.tensor(actions),
        torch.tensor(rewards, dtype=torch.float32),
        dones,
    )


def concat(blocks: list[Transitions]) -> Transitions:
    return Transitions(
        *(
            torch.cat([getattr(b, f) for b in blocks])
            for f in ("states", "actions", "rewards", "dones")
        )
    )
