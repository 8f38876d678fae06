"""The training loop of `mara train`: collect → reward → store → update → log → checkpoint.

Each iteration draws prompts (a fixed benign share when labelled, each drawn prompt `repeats`
times, a share of those guided toward `guide_text`), runs them as stochastic episodes through
the batched engine (episodes.py), scores the responses with the reward (optionally centred on
the agent's own episodes of the same prompt, rewards.centre_by_prompt), appends their
transitions to the replay buffer and — once the buffer holds `warmup` transitions — runs
`updates_per_episode × episodes` SAC updates (sac.py). Every `checkpoint_every` iterations
and at the end it writes the checkpoint, the agent and its card (checkpoint.py), the metrics
and samples logs and the training plot. `resume=True` reloads the checkpoint and continues up
to `episodes` (which may be raised to train longer), exactly as if the run had not stopped.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.errors import MaraError
from mara_serve.engine.loading import LoadedModel, ModelConfig, load_model, render_chat
from mara_serve.engine.sampling import SamplingParams
from mara_serve.training.checkpoint import RunDir, build_card
from mara_serve.training.data import PromptSampler, training_prompts
from mara_serve.training.demonstrations import (
    DemoAgent,
    behaviour_clone,
    choose,
    demonstration_pairs,
)
from mara_serve.training.episodes import (
    collect_episodes,
    concat,
    episode_transitions,
    run_episodes,
    token_texts,
)
from mara_serve.training.metrics import MetricsLog, episode_stats
from mara_serve.training.plots import plot_training
from mara_serve.training.replay import ReplayBuffer
from mara_serve.training.rewards import Reward, centre_by_prompt, parse_reward
from mara_serve.training.sac import DiscreteSAC, SACConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    prompts: tuple[str, ...]
    reward: str
    out_dir: Path
    model: ModelConfig = field(default_factory=ModelConfig)
    sac: SACConfig = field(default_factory=SACConfig)
    name: str = "mara-agent"
    episodes: int = 21_000  # the paper's run
    episodes_per_iter: int = 32  # episodes decoded together in one engine batch
    repeats: int = 1  # episodes per drawn prompt (the authors' repeat_cnt); one shared prefill
    reward_baseline: str = "none"  # "prompt": R minus the mean R of the prompt's other episodes
    # guided exploration toward this opening, or any of several alternatives (EpisodeAgent)
    guide_text: str | tuple[str, ...] | None = None
    guide_fraction: float = 0.25  # share of each prompt's `repeats` episodes that are guided
    max_new_tokens: int = 512  # the paper's; a refusal is decided in the first tokens
    # Mixed episode lengths: each episode's max_new_tokens drawn from these (seeded), so the
    # agent also meets late tokens and the end token; None: every episode max_new_tokens.
    episode_lengths: tuple[int, ...] | None = None
    top_k: int = 40
    top_p: float = 0.95
    chunk_size: int | None = None  # engine chunked candidate scoring (cheaper when rejecting)
    kl_coef: float = 0.1
    propagate: bool = True  # add γ^k·R to every transition (the authors' postback_reward)
    warmup: int = 65_536  # transitions in the buffer before the first update (paper: > 64·1024)
    buffer_size: int = 1_000_000
    updates_per_episode: float = 10.0  # the authors' update_time per collected episode
    benign_fraction: float = 0.5
    harm_filter: str = "keywords"
    max_prompt_tokens: int = 512
    # Reward-filtered demonstrations (demonstrations.py): prompts demonstrated before SAC, the
    # actor fitted to them for `bc_epochs`; 0: none (the paper's plain SAC).
    demonstrations: int = 0
    demo_min_reward: float = 0.0  # keep a prompt's better episode only from this reward up
    bc_epochs: int = 8
    bc_lr: float = 1e-3
    checkpoint_every: int = 10  # iterations
    seed: int = 0
    resume: bool = False
    progress: bool = True
    command: str = ""  # the command line, recorded in the card

    def to_json(self) -> dict:
        d = asdict(self)
        d["out_dir"] = str(self.out_dir)
        d["model"] = {k: str(v) for k, v in asdict(self.model).items()}
        return d


class TrainingError(MaraError):
    """Training cannot start or continue (bad data, incompatible checkpoint…)."""


class Trainer:
    """`lm` and `reward` may be injected (tests, notebooks); otherwise they come from `cfg`."""

    def __init__(
        self, cfg: TrainConfig, lm: LoadedModel | None = None, reward: Reward | None = None
    ):
        self.cfg = cfg
        if cfg.demonstrations < 0 or cfg.bc_epochs < 1:
            raise TrainingError("--demonstrations must be >= 0 and --bc-epochs >= 1")
        if cfg.demonstrations and not cfg.guide_text:
            raise TrainingError("--demonstrations needs --guide-text (the guided episode)")
        # A bad reward spec or prompt file fails here, before the model is loaded.
        self.reward = reward if reward is not None else parse_reward(cfg.reward)
        self.prompts, self.data_summary = training_prompts(
            cfg.prompts, cfg.harm_filter, cfg.benign_fraction, self.reward.needs_labels
        )
        self.out = Path(cfg.out_dir)
        self.run_dir = RunDir(self.out)
        self.lm = lm if lm is not None else load_model(cfg.model)
        self.device = self.lm.device
        self.sac = DiscreteSAC(self.lm.hidden_size, cfg.sac, self.device)
        self.replay = ReplayBuffer(cfg.buffer_size, self.lm.hidden_size, self.device)
        self.sampler = PromptSampler(self.prompts, cfg.benign_fraction, cfg.seed)
        self.action_gen = torch.Generator(device=self.device).manual_seed(cfg.seed + 1)
        self.batch_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.engine = LLMEngine(
            self.lm,
            EngineConfig(
                max_running=cfg.episodes_per_iter,
                max_waiting=max(256, cfg.episodes_per_iter),
                chunk_size=cfg.chunk_size,
                defer_undecided=False,  # the episodes' agent calls in the recipe's order
                agent_priors=False,
            ),
        )
        lengths = cfg.episode_lengths or (cfg.max_new_tokens,)
        self.params = [
            SamplingParams(max_new_tokens=n, top_k=cfg.top_k, top_p=cfg.top_p) for n in lengths
        ]  # one per length; each episode draws one (self.length_gen)
        self.length_gen = random.Random(cfg.seed + 3)
        self.metrics = MetricsLog(self.out)
        self.iteration = self.episodes_done = 0
        self.demo_summary: dict | None = None  # set once the demonstrations are done
        self.elapsed = 0.0  # training wall time over all sessions of this run
        self._prompt_ids: dict[str, list[int] | None] = {}
        if cfg.resume:
            self._load_checkpoint()
        elif self.run_dir.holds_a_run():
            raise TrainingError(
                f"{self.out} already holds a training run; pass --resume to continue it or "
                "choose another --out"
            )
        self.run_dir.write_config(cfg.to_json())

    # ---- setup --------------------------------------------------------------------------

    def _ids(self, text: str) -> list[int] | None:
        if text not in self._prompt_ids:
            ids = render_chat(self.lm.tokenizer, [{"role": "user", "content": text}])
            self._prompt_ids[text] = ids if len(ids) <= self.cfg.max_prompt_tokens else None
        return self._prompt_ids[text]

    def _decode(self, ids: list[int]) -> str:
        """An answer's text, as the reward scores it."""
        return self.lm.tokenizer.decode(ids, skip_special_tokens=True)

    def _draw(self, n: int):
        """n episodes: ceil(n / repeats) drawn prompts, each `repeats` times in a row (identical
        prompts admitted together share one prefill), the first `guide_fraction · repeats`
        of each group guided by `guide_text`."""
        cfg = self.cfg
        guided = round(cfg.guide_fraction * cfg.repeats) if cfg.guide_text else 0
        drawn, drawn_ids = self._draw_prompts(-(-n // cfg.repeats))
        prompts = [p for p in drawn for _ in range(cfg.repeats)]
        ids = [x for x in drawn_ids for _ in range(cfg.repeats)]
        guides = [cfg.guide_text if j < guided else None
                  for _ in drawn for j in range(cfg.repeats)]  # fmt: skip
        return prompts[:n], ids[:n], guides[:n]

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> Path:
        cfg = self.cfg
        bar = None
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=cfg.episodes,
                initial=self.episodes_done,
                unit="ep",
                dynamic_ncols=True,
                desc="mara train",
            )
        if cfg.demonstrations and self.demo_summary is None:
            self.demonstrate()
            self.save_checkpoint()  # a resumed run does not demonstrate again
        try:
            while self.episodes_done < cfg.episodes:
                row = self.train_iteration(
                    min(cfg.episodes_per_iter, cfg.episodes - self.episodes_done)
                )
                if bar is not None:
                    bar.update(row["episodes_in_iter"])
                    shown = ("reward", "refusal_harmful", "refusal_benign", "rejection_rate")
                    bar.set_postfix({k: f"{row[k]:.2f}" for k in shown if k in row})
                if self.iteration % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        self.save_checkpoint()
        return self.out

    def train_iteration(self, n: int) -> dict:
        cfg, t0 = self.cfg, time.monotonic()
        prompts, ids, guides = self._draw(n)
        params = [self.length_gen.choice(self.params) for _ in prompts]
        episodes = collect_episodes(
            self.engine, self.sac.actor, prompts, ids, params, self.action_gen, self._decode,
            guides,
        )  # fmt: skip
        t1 = time.monotonic()
        rewards = self.reward.score_batch(
            [e.prompt for e in episodes], [e.response for e in episodes]
        )
        returns = (
            centre_by_prompt(episodes, rewards) if cfg.reward_baseline == "prompt" else rewards
        )
        blocks = [
            b
            for e, r in zip(episodes, returns, strict=True)
            if (b := episode_transitions(e, r, cfg.kl_coef, cfg.sac.gamma, cfg.propagate))
        ]
        if blocks:
            self.replay.add(concat(blocks))
        t2 = time.monotonic()
        losses: list[dict] = []
        if len(self.replay) >= cfg.warmup:
            for _ in range(round(cfg.updates_per_episode * len(episodes))):
                batch = self.replay.sample(cfg.sac.batch_size, self.batch_gen)
                losses.append(self.sac.update(*batch))
        t3 = time.monotonic()
        self.iteration += 1
        self.episodes_done += len(prompts)
        self.elapsed += t3 - t0
        row = {
            "iteration": self.iteration,
            "episodes": self.episodes_done,
            "episodes_in_iter": len(prompts),
            "transitions": sum(len(b) for b in blocks),
            "replay_size": len(self.replay),
            "updates": self.sac.updates,
            "alpha": self.sac.alpha,
            **episode_stats(episodes, rewards),
            **{k: sum(x[k] for x in losses) / len(losses) for k in (losses[0] if losses else {})},
            "time_collect_s": round(t1 - t0, 2),
            "time_reward_s": round(t2 - t1, 2),
            "time_update_s": round(t3 - t2, 2),
            "elapsed_s": round(self.elapsed, 1),
        }
        self.metrics.append(row)
        self.metrics.append_samples(self.iteration, episodes, rewards)
        return row

    # ---- demonstrations (demonstrations.py) ----------------------------------------------

    def demonstrate(self) -> dict:
        """Demonstrate `cfg.demonstrations` prompts (own vs guided episode, the reward picks),
        fit the actor to the kept ones, and seed the replay buffer with both episodes."""
        cfg, t0 = self.cfg, time.monotonic()
        token_text = token_texts(self._decode)
        per_batch = max(1, cfg.episodes_per_iter // 2)
        kept, held, counts = [], [], {"own": 0, "guided": 0, "none": 0, "failed": 0}
        records, drawn = [], 0
        while drawn < cfg.demonstrations:
            prompts, ids = self._draw_prompts(min(per_batch, cfg.demonstrations - drawn))
            params = [self.length_gen.choice(self.params) for _ in prompts]
            agents = [DemoAgent(self.lm.hidden_size, g, token_text, self.lm.eos_token_ids)
                      for _ in prompts for g in (None, cfg.guide_text)]  # fmt: skip
            episodes = run_episodes(
                self.engine, [p for p in prompts for _ in (0, 1)],
                [x for x in ids for _ in (0, 1)], [sp for sp in params for _ in (0, 1)],
                agents, self._decode,
            )  # fmt: skip
            both = [(j, episodes[2 * j], episodes[2 * j + 1]) for j in range(len(prompts))]
            counts["failed"] += sum(own is None or guided is None for _, own, guided in both)
            both = [(j, o, g) for j, o, g in both if o is not None and g is not None]
            scores = self.reward.score_batch(  # one batch: own, guided, own, guided…
                [e.prompt for _, own, guided in both for e in (own, guided)],
                [e.response for _, own, guided in both for e in (own, guided)],
            )
            blocks = []
            for (j, own, guided), r_own, r_guided in zip(both, scores[::2], scores[1::2],
                                                          strict=True):  # fmt: skip
                pick = choose(r_own, r_guided, cfg.demo_min_reward)
                counts[pick or "none"] += 1
                records.append({"prompt": own.prompt.text, "label": own.prompt.label,
                                "own": own.response, "own_reward": r_own,
                                "guided": guided.response, "guided_reward": r_guided,
                                "kept": pick})  # fmt: skip
                if pick is not None:
                    kept.append(own if pick == "own" else guided)
                    held.append((drawn + j) % 10 == 9)  # every tenth prompt validates
                # both are valid experience for the critics, centred on the own answer
                for ep, r in ((own, r_own), (guided, r_guided - r_own)):
                    if b := episode_transitions(ep, r, cfg.kl_coef, cfg.sac.gamma, cfg.propagate):
                        blocks.append(b)
            if blocks:
                self.replay.add(concat(blocks))
            drawn += len(prompts)
            log.info("demonstrations: %d / %d prompts %s", drawn, cfg.demonstrations, counts)
        pairs = demonstration_pairs(kept, held)
        if pairs is None:
            raise TrainingError("no demonstration reached --demo-min-reward; nothing to clone")
        fit = behaviour_clone(self.sac.actor, pairs, cfg.bc_epochs, cfg.bc_lr,
                              cfg.sac.batch_size, self.batch_gen, cfg.sac.grad_clip)  # fmt: skip
        self.demo_summary = {"prompts": drawn, "kept": counts, "behaviour_cloning": fit,
                             "time_s": round(time.monotonic() - t0, 1)}  # fmt: skip
        self.elapsed += time.monotonic() - t0
        log.info("behaviour cloning: %s", fit)
        (self.out / "demonstrations.json").write_text(json.dumps(self.demo_summary, indent=2))
        with open(self.out / "demonstrations.jsonl", "w") as f:  # what was demonstrated
            f.writelines(json.dumps(r) + "\n" for r in records)
        return self.demo_summary

    def _draw_prompts(self, n: int) -> tuple[list, list[list[int]]]:
        """n distinct draws (prompts longer than max_prompt_tokens skipped)."""
        prompts, ids = [], []
        for _ in range(100 * n):
            if len(prompts) >= n:
                break
            p = self.sampler.sample(1)[0]
            if (x := self._ids(p.text)) is not None:
                prompts.append(p)
                ids.append(x)
        if not prompts:
            raise TrainingError(f"no prompt fits max_prompt_tokens={self.cfg.max_prompt_tokens}")
        return prompts, ids

    # ---- checkpoints --------------------------------------------------------------------

    def save_checkpoint(self) -> None:
        state = {
            "sac": self.sac.state_dict(),
            "sampler": self.sampler.state_dict(),
            "action_gen": self.action_gen.get_state(),
            "batch_gen": self.batch_gen.get_state(),
            "length_gen": self.length_gen.getstate(),
            "iteration": self.iteration,
            "episodes": self.episodes_done,
            "elapsed": self.elapsed,
            "demonstrations": json.dumps(self.demo_summary),  # a string: weights_only loads
            "hidden_size": self.lm.hidden_size,
            "inner_dim": self.cfg.sac.inner_dim,
        }
        self.run_dir.save(state, self.replay.state_dict())
        self.export_agent()
        self.metrics.write_csv()
        if rows := self.metrics.rows():
            plot_training(rows, self.out / "training.png", f"{self.cfg.name} on {self.lm.name}")

    def _load_checkpoint(self) -> None:
        try:
            state, replay = self.run_dir.load(self.device)
        except FileNotFoundError:
            raise TrainingError(f"--resume: no checkpoint at {self.run_dir.state_path}") from None
        ours = (self.lm.hidden_size, self.cfg.sac.inner_dim)
        if (state["hidden_size"], state["inner_dim"]) != ours:
            raise TrainingError(
                f"--resume: the checkpoint has hidden size {state['hidden_size']} and inner dim "
                f"{state['inner_dim']}; this run has {ours[0]} and {ours[1]} "
                "(another model or --inner-dim?)"
            )
        self.sac.load_state_dict(state["sac"])
        self.sampler.load_state_dict(state["sampler"])
        # generator states are CPU byte tensors even for a CUDA generator; the checkpoint was
        # loaded onto the run's device
        self.action_gen.set_state(state["action_gen"].cpu())
        self.batch_gen.set_state(state["batch_gen"].cpu())
        if "length_gen" in state:  # checkpoints before mixed episode lengths have none
            self.length_gen.setstate(state["length_gen"])
        self.iteration, self.episodes_done = state["iteration"], state["episodes"]
        self.elapsed = state["elapsed"]
        self.demo_summary = json.loads(state.get("demonstrations", "null"))
        if replay is not None:
            self.replay.load_state_dict(replay)
        self.metrics.truncate(self.iteration)
        log.info("resumed at iteration %d (%d episodes, %d transitions in the buffer)",
                 self.iteration, self.episodes_done, len(self.replay))  # fmt: skip

    def export_agent(self) -> Path:
        """Write the current actor as OUT/agent.safetensors + OUT/agent.json (the card)."""
        training = {
            "iterations": self.iteration,
            "episodes": self.episodes_done,
            "updates": self.sac.updates,
            "transitions": self.replay.total_added,
            "wall_time_s": round(self.elapsed, 1),
            "device": str(self.device),
            "torch_threads": torch.get_num_threads(),
        }
        extra = {"data": self.data_summary, "reward": self.reward.describe(),
                 "training": training}  # fmt: skip
        if self.demo_summary is not None:
            extra["demonstrations"] = self.demo_summary
        card = build_card(self.cfg, self.lm.name, self.lm.hidden_size, extra)
        return self.run_dir.export_agent(self.sac.actor, card)
