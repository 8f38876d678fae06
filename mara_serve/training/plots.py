"""PNG charts: training curves (from the metrics rows) and the eval bar chart.

matplotlib is imported lazily with the non-interactive Agg backend, so headless machines and
servers never need a display, and importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


_PANELS = (
    ("terminal reward", ("reward", "reward_harmful", "reward_benign")),
    ("refusal rate", ("refusal_harmful", "refusal_benign", "refusal_rate")),
    (
        "agent rejections",
        (
            "rejection_rate",
            "fallback_rate",
            "greedy_rejects_top1_benign",
            "greedy_rejects_top1_harmful",
        ),
    ),
    ("temperature α", ("alpha",)),
    ("critic loss", ("critic_loss",)),
    ("actor loss / entropy", ("actor_loss", "entropy")),
)


def plot_training(rows: list[dict], path: Path, title: str = "MARA agent training") -> Path:
    """Six panels against episodes; rate and reward curves are smoothed over 5 iterations."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    for ax, (name, keys) in zip(axes.flat, _PANELS, strict=True):
        for key in keys:
            pts = [(r["episodes"], r[key]) for r in rows if r.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            smooth = not key.endswith("loss") and key not in ("alpha", "entropy")
            ax.plot(xs, _smooth(list(ys), 5) if smooth else ys, label=key)
        ax.set_title(name)
        ax.set_xlabel("episodes")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_eval(report: dict, path: Path) -> Path:
    """Bars of base vs aligned: refusal on harmful, over-refusal on benign, perplexity."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    groups = [("harmful", "refusal rate\n(harmful)"), ("benign", "refusal rate\n(benign)"),
              ("alarming", "refusal rate\n(alarming)")]  # fmt: skip
    labels, base, aligned = [], [], []
    for split, label in groups:
        if split in report["splits"]:
            s = report["splits"][split]
            labels.append(label)
            base.append(100 * s["base"]["refusal_rate"])
            aligned.append(100 * s["aligned"]["refusal_rate"])
    x = range(len(labels))
    ax1.bar([i - 0.2 for i in x], base, 0.4, label="base")
    ax1.bar([i + 0.2 for i in x], aligned, 0.4, label="aligned")
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("%")
    ax1.set_ylim(0, 100)
    ax1.legend()
    ax1.set_title("refusals")
    splits = list(report["splits"])
    ppl_b = [report["splits"][s]["base"]["perplexity"] for s in splits]
    ppl_a = [report["splits"][s]["aligned"]["perplexity"] for s in splits]
    ax2.bar([i - 0.2 for i in range(len(splits))], ppl_b, 0.4, label="base")
    ax2.bar([i + 0.2 for i in range(len(splits))], ppl_a, 0.4, label="aligned")
    ax2.set_xticks(list(range(len(splits))), splits)
    ax2.set_ylabel("perplexity under the base model")
    ax2.legend()
    ax2.set_title("fluency")
    fig.suptitle(f"{report['agent']} on {report['model']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
