"""`mara train`: flags → `TrainConfig` → `Trainer.run()`; prints where the agent went."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mara_serve.cli.common import add_model_args, model_config, optional_int, set_threads
from mara_serve.training.sac import SACConfig
from mara_serve.training.trainer import TrainConfig, Trainer


def add_parser(sub) -> None:  # sub: the `mara` parser's subparsers
    t = sub.add_parser(
        "train",
        help="train a MARA agent for a base model and a reward (discrete SAC)",
        description="Train an accept/reject agent with discrete soft actor-critic "
        "(docs/algorithm.md §6). Hyper-parameter defaults are the paper's; see "
        "scripts/train_default_agent.sh for a one-hour CPU recipe.",
    )
    add_model_args(t)
    t.add_argument(
        "--prompts",
        nargs="+",
        required=True,
        metavar="[LABEL:]FILE",
        help="prompt files (JSON array or JSONL with 'instruction'); prefix "
        "harmful: or benign: to label a file; HH 'source' fields label "
        "themselves",
    )
    t.add_argument(
        "--reward",
        required=True,
        metavar="SPEC",
        help="refusal[:k=v,...] | hf:reward=DIR[,cost=DIR,w_r=..,w_c=..] | module:function",
    )
    t.add_argument("--out", required=True, help="run directory (agent, card, checkpoints, logs)")
    t.add_argument("--name", default=None, help="agent name (default: the --out folder name)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    g = t.add_argument_group("episodes")
    g.add_argument("--episodes", type=int, default=21000, help="total episodes (paper: 21000)")
    g.add_argument(
        "--episodes-per-iter",
        type=int,
        default=32,
        help="episodes decoded together per iteration (engine batch)",
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="episodes per drawn prompt (they share one prefill)",
    )
    g.add_argument("--max-new-tokens", type=int, default=512, help="tokens per episode")
    g.add_argument(
        "--episode-lengths", default=None, metavar="N,N,...",
        help="mixed episode lengths: each episode's token budget drawn from this list (seeded), "
        "so the agent also learns late tokens and the end token (overrides --max-new-tokens)",
    )  # fmt: skip
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument(
        "--chunk-size",
        type=optional_int,
        default=None,
        help="score candidates m at a time (cheaper while the agent rejects)",
    )
    g.add_argument("--max-prompt-tokens", type=int, default=512, help="skip longer prompts")
    g.add_argument(
        "--benign-fraction",
        type=float,
        default=0.5,
        help="share of benign prompts per batch when prompts are labelled",
    )
    g.add_argument(
        "--harm-filter",
        choices=("keywords", "none"),
        default="keywords",
        help="keep harmful-labelled prompts only if they name a harmful intent",
    )
    s = t.add_argument_group("soft actor-critic")
    s.add_argument("--gamma", type=float, default=0.99)
    s.add_argument("--tau", type=float, default=0.005, help="soft target update rate")
    s.add_argument("--batch-size", type=int, default=1024)
    s.add_argument("--lr-actor", type=float, default=3e-4)
    s.add_argument("--lr-critic", type=float, default=3e-4)
    s.add_argument("--lr-alpha", type=float, default=3e-4)
    s.add_argument("--alpha", type=float, default=0.01, help="initial temperature")
    s.add_argument("--target-entropy-ratio", type=float, default=0.6, help="× ln 2")
    s.add_argument("--grad-clip", type=float, default=0.5)
    s.add_argument("--inner-dim", type=int, default=1024, help="agent width D")
    s.add_argument(
        "--init-accept-prob",
        type=float,
        default=None,
        help="start the actor near this p(accept) (default: plain initialisation)",
    )
    s.add_argument(
        "--guide-text",
        nargs="+",
        default=None,
        metavar="TEXT",
        help="guided exploration: steer a share of episodes toward this opening, among the "
        "model's own candidates (e.g. a refusal; the reward judges it); several texts are "
        "alternatives — the guide follows whichever the model's candidates continue",
    )
    s.add_argument(
        "--guide-fraction",
        type=float,
        default=0.25,
        help="share of each prompt's --repeats episodes that are guided",
    )
    s.add_argument(
        "--reward-baseline",
        choices=("none", "prompt"),
        default="none",
        help="prompt: subtract the mean reward of the prompt's other episodes (--repeats > 1)",
    )
    d = t.add_argument_group("demonstrations (before SAC)")
    d.add_argument(
        "--demonstrations", type=int, default=0, metavar="N",
        help="demonstrate N prompts first: the model's own greedy answer vs a --guide-text "
        "episode, the reward keeps the better; the actor is fitted to the kept ones and both "
        "seed the replay buffer (0: plain SAC)",
    )  # fmt: skip
    d.add_argument("--demo-min-reward", type=float, default=0.0,
                   help="keep a prompt's better episode only from this reward up")  # fmt: skip
    d.add_argument("--bc-epochs", type=int, default=8, help="behaviour-cloning epochs")
    d.add_argument("--bc-lr", type=float, default=1e-3, help="behaviour-cloning learning rate")
    s.add_argument("--kl-coef", type=float, default=0.1, help="KL(agent ‖ LLM) shaping")
    s.add_argument(
        "--propagate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add the discounted terminal reward to every transition",
    )
    s.add_argument(
        "--warmup",
        type=int,
        default=65536,
        help="transitions in the replay buffer before updates start",
    )
    s.add_argument("--buffer-size", type=int, default=1_000_000)
    s.add_argument(
        "--updates-per-episode",
        type=float,
        default=10.0,
        help="SAC gradient steps per collected episode",
    )
    o = t.add_argument_group("run")
    o.add_argument("--checkpoint-every", type=int, default=10, help="iterations")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    sac = SACConfig(
        gamma=args.gamma,
        tau=args.tau,
        batch_size=args.batch_size,
        lr_actor=args.lr_actor,
        lr_critic=args.lr_critic,
        lr_alpha=args.lr_alpha,
        alpha=args.alpha,
        target_entropy_ratio=args.target_entropy_ratio,
        grad_clip=args.grad_clip,
        inner_dim=args.inner_dim,
        init_accept_prob=args.init_accept_prob,
    )
    model = model_config(args)
    return TrainConfig(
        prompts=tuple(args.prompts),
        reward=args.reward,
        out_dir=Path(args.out),
        model=model,
        sac=sac,
        name=args.name or Path(args.out).name,
        episodes=args.episodes,
        episodes_per_iter=args.episodes_per_iter,
        repeats=args.repeats,
        reward_baseline=args.reward_baseline,
        guide_text=_guide(args.guide_text),
        guide_fraction=args.guide_fraction,
        max_new_tokens=args.max_new_tokens,
        episode_lengths=_lengths(args.episode_lengths),
        top_k=args.top_k,
        top_p=args.top_p,
        chunk_size=args.chunk_size,
        kl_coef=args.kl_coef,
        propagate=args.propagate,
        warmup=args.warmup,
        buffer_size=args.buffer_size,
        updates_per_episode=args.updates_per_episode,
        benign_fraction=args.benign_fraction,
        harm_filter=args.harm_filter,
        max_prompt_tokens=args.max_prompt_tokens,
        demonstrations=args.demonstrations,
        demo_min_reward=args.demo_min_reward,
        bc_epochs=args.bc_epochs,
        bc_lr=args.bc_lr,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
        command=args.command_line,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    set_threads(args.threads)
    torch.manual_seed(args.seed)  # network initialisation
    cfg = config_from_args(args)
    out = Trainer(cfg).run()
    print(
        f"agent written to {out} (agent.safetensors + agent.json); "
        f"curves in {out / 'training.png'}",
        file=sys.stderr,
    )
    return 0


def _lengths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        lengths = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SystemExit(
            f"error: --episode-lengths: comma-separated integers, got {text!r}"
        ) from None
    if not lengths or min(lengths) < 1:
        raise SystemExit("error: --episode-lengths: at least one length, each >= 1")
    return lengths


def _guide(texts: list[str] | None) -> str | tuple[str, ...] | None:
    """One text stays a string (as older run configs record it); several are a tuple."""
    if not texts:
        return None
    return texts[0] if len(texts) == 1 else tuple(texts)
