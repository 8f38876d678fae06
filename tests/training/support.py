"""Helpers shared by the trainer tests (tests cannot import each other or a conftest)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import tiny_llama

from mara_serve.training.sac import SACConfig
from mara_serve.training.trainer import TrainConfig, Trainer


def _prompt_files(tmp_path: Path, make_prompt_text) -> tuple[str, str]:
    harmful, benign = tmp_path / "harmful.json", tmp_path / "benign.jsonl"
    harmful.write_text(json.dumps([{"instruction": make_prompt_text(i)} for i in range(10)]))
    benign.write_text(
        "".join(json.dumps({"instruction": make_prompt_text(100 + i)}) + "\n" for i in range(10))
    )
    return f"harmful:{harmful}", f"benign:{benign}"


def _config(tmp_path, prompts, out="run", **kw) -> TrainConfig:
    base = dict(
        prompts=prompts,
        reward="refusal",
        out_dir=tmp_path / out,
        name="tiny-safety",
        sac=SACConfig(inner_dim=64, batch_size=64),
        episodes=32,
        episodes_per_iter=8,
        max_new_tokens=4,
        warmup=16,
        updates_per_episode=1,
        checkpoint_every=2,
        harm_filter="none",  # the synthetic prompts name no harmful intent
        progress=False,
    )
    return TrainConfig(**{**base, **kw})


def _trainer(cfg: TrainConfig, make_tokenizer, device: str = "cpu") -> Trainer:
    lm = tiny_llama(device=device)
    lm.tokenizer = make_tokenizer()
    torch.manual_seed(0)  # network initialisation
    return Trainer(cfg, lm=lm)
