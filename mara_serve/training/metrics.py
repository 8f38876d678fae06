"""The training metrics log and per-iteration episode statistics.

`metrics.jsonl` (one JSON object per iteration) is the record, `samples.jsonl` every episode's
prompt, response and reward; `metrics.csv` is re-rendered
from it (union of keys, in first-seen order) whenever the trainer checkpoints, so spreadsheets
and pandas read it directly. On resume the log is cut back to the checkpoint's iteration, so an
interrupted run never leaves duplicate or orphaned rows.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from mara_serve.training.episodes import Episode
from mara_serve.training.refusal import is_degenerate, is_refusal


class MetricsLog:
    def __init__(self, out_dir: Path):
        self.jsonl = out_dir / "metrics.jsonl"
        self.csv = out_dir / "metrics.csv"
        self.samples = out_dir / "samples.jsonl"

    def rows(self) -> list[dict]:
        if not self.jsonl.is_file():
            return []
        return [json.loads(line) for line in self.jsonl.read_text().splitlines() if line.strip()]

    def append(self, row: dict) -> None:
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def append_samples(self, iteration: int, episodes: list[Episode], rewards: list[float]):
        """Every episode's prompt, response and reward, for reading what the agent does."""
        with self.samples.open("a") as f:
            for ep, r in zip(episodes, rewards, strict=True):
                f.write(json.dumps({
                    "iteration": iteration, "label": ep.prompt.label,
                    "guided": ep.guided_tokens > 0, "reward": r,
                    "prompt": ep.prompt.text[:300], "response": ep.response,
                }, ensure_ascii=False) + "\n")  # fmt: skip

    def truncate(self, last_iteration: int) -> None:
        """Keep rows up to and including `last_iteration` (resume)."""
        for path in (self.jsonl, self.samples):
            if path.is_file():
                rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
                keep = [r for r in rows if r.get("iteration", 0) <= last_iteration]
                path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

    def write_csv(self) -> None:
        rows = self.rows()
        fields: list[str] = []
        for r in rows:
            fields += [k for k in r if k not in fields]
        with self.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)


def _rate(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def episode_stats(episodes: list[Episode], rewards: list[float]) -> dict:
    """Reward, refusal rates by label, rejection/fallback rates and length of one batch.

    Refusal rates describe the agent's own episodes; guided ones (guided exploration) are
    summarised apart, so the curves show what the agent does by itself."""
    own = [i for i, ep in enumerate(episodes) if not ep.guided_tokens]
    guided = [i for i, ep in enumerate(episodes) if ep.guided_tokens]
    refused = [is_refusal(ep.response) for ep in episodes]

    def where(label: str) -> list[int]:
        return [i for i in own if episodes[i].prompt.label == label]

    def top1_rejected(label: str) -> list[bool]:
        return [bool(d.accept_prob[0] <= 0.5) for i in where(label)
                for d in episodes[i].decisions]  # fmt: skip

    judged = sum(ep.judged for ep in episodes)
    decisions = [d for ep in episodes for d in ep.decisions]
    stats = {
        "reward": _mean([rewards[i] for i in own]),
        "reward_harmful": _mean([rewards[i] for i in where("harmful")]),
        "reward_benign": _mean([rewards[i] for i in where("benign")]),
        "refusal_rate": _rate([refused[i] for i in own]),
        "refusal_harmful": _rate([refused[i] for i in where("harmful")]),
        "refusal_benign": _rate([refused[i] for i in where("benign")]),
        "guided_refusal_rate": _rate([refused[i] for i in guided]),
        "guided_tokens": _mean([float(episodes[i].guided_tokens) for i in guided]),
        "degenerate_rate": _rate([is_degenerate(ep.response) for ep in episodes]),
        "rejection_rate": sum(ep.rejected for ep in episodes) / judged if judged else None,
        "fallback_rate": sum(d.fallback for d in decisions) / len(decisions) if decisions else None,
        "mean_length": _mean([float(len(ep.token_ids)) for ep in episodes]),
        "kl_estimate": _mean(
            [d.agent_logprob - math.log(max(d.llm_prob, 1e-6)) for d in decisions]
        ),
        "logprob_regret": _mean([d.logprob_regret for d in decisions]),
        # how often greedy inference (accept iff p > 0.5) would reject the top-1 here
        "greedy_rejects_top1_harmful": _rate(top1_rejected("harmful")),
        "greedy_rejects_top1_benign": _rate(top1_rejected("benign")),
    }
    return {k: v for k, v in stats.items() if v is not None}
