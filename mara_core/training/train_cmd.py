"""`mara train`: flags → `TrainConfig` → `Trainer.run()`; prints where the agent went."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mara_core.cli import model_config
from mara_core.training.sac import SACConfig
from mara_core.training.trainer import TrainConfig, Trainer


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
        guide_text=args.guide_text,
        guide_fraction=args.guide_fraction,
        max_new_tokens=args.max_new_tokens,
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
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
        command=args.command_line,
    )


def run_train(args: argparse.Namespace) -> int:
    import torch

    torch.manual_seed(args.seed)  # network initialisation
    cfg = config_from_args(args)
    out = Trainer(cfg).run()
    print(
        f"agent written to {out} (agent.safetensors + agent.json); "
        f"curves in {out / 'training.png'}",
        file=sys.stderr,
    )
    return 0
