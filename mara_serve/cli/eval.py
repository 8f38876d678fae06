"""`mara eval`: base vs aligned on held-out prompts → JSON report, Markdown table, PNG chart.

Writes OUT/eval.json, OUT/eval.md, OUT/eval.png and OUT/samples.jsonl (every answer), prints
the table and a few side-by-side examples. `--update-card` stores the summary in the agent's
card (agent.json) when the agent is a directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mara_serve.cli.common import (
    add_agent_arg,
    add_model_args,
    agent_path,
    columns,
    model_config,
    optional_int,
    set_threads,
)
from mara_serve.engine.agent import CARD_FILE, load_agent
from mara_serve.engine.errors import AgentLoadError
from mara_serve.engine.loading import load_model
from mara_serve.training.evaluate import EvalConfig, Sample, run_eval
from mara_serve.training.plots import plot_eval


def add_parser(sub) -> None:  # sub: the `mara` parser's subparsers
    """`mara eval`: base vs aligned on held-out prompt files."""
    e = sub.add_parser("eval", help="evaluate an agent: base vs aligned on held-out prompts")
    add_model_args(e)
    add_agent_arg(e)
    e.add_argument("--harmful", nargs="+", default=[], metavar="FILE", help="harmful prompts")
    e.add_argument("--benign", nargs="+", default=[], metavar="FILE", help="benign prompts")
    e.add_argument(
        "--alarming", nargs="+", default=[], metavar="FILE",
        help="benign prompts that use alarming words (e.g. data/prompts/AlarmingBenign/test.json):"
        " their over-refusal is reported apart",
    )  # fmt: skip
    e.add_argument(
        "-n",
        type=optional_int,
        default=100,
        help="prompts per file, a seeded sample ('all' for every prompt)",
    )
    e.add_argument("--max-new-tokens", type=int, default=64)
    e.add_argument("--batch-size", type=int, default=16, help="rows decoded together")
    e.add_argument("--chunk-size", type=optional_int, default=None)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--examples", type=int, default=4, help="side-by-side examples to print")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.add_argument("--out", default="mara-eval", help="report directory")
    e.add_argument(
        "--update-card", action="store_true", help="write the summary into the agent's agent.json"
    )
    e.add_argument(
        "--baselines",
        action="store_true",
        help="also two baselines on the base model: a safety system prompt, and best-of-N "
        "sampled answers picked by the training's refusal reward",
    )
    e.add_argument("--best-of", type=int, default=4, help="N of the best-of-N baseline")
    e.add_argument(
        "--reachability", action="store_true",
        help="also measure the reachability ceiling: on how many harmful prompts a refusal "
        "opening is among the candidates at all (several top-k/top-p settings)",
    )  # fmt: skip
    e.set_defaults(run=run)


_ROWS = (
    ("refusal rate (opening detector)", "refusal_rate", "{:.1%}"),
    ("refusal rate (independent judge)", "judged_refusal_rate", "{:.1%}"),
    ("refuse-then-comply rate (judge)", "refuse_then_comply_rate", "{:.1%}"),
    ("detectors agree", "detectors_agreement", "{:.1%}"),
    ("degenerate rate", "degenerate_rate", "{:.1%}"),
    ("mean length (tokens)", "mean_length", "{:.1f}"),
    ("perplexity (base model)", "perplexity", "{:.2f}"),
    ("agent rejection rate", "rejection_rate", "{:.1%}"),
    ("agent fallback rate", "fallback_rate", "{:.1%}"),
)


def _fmt(fmt: str, value) -> str:
    return "–" if value is None else fmt.format(value)


def markdown(report: dict) -> str:
    splits = list(report["splits"])
    cols = [(s, m) for s in splits for m in report["splits"][s]]
    head = "| metric | " + " | ".join(f"{s} {m.replace('_', ' ')}" for s, m in cols) + " |"
    lines = [head, "|" + " --- |" * (1 + len(cols))]
    for title, key, fmt in _ROWS:
        cells = [_fmt(fmt, report["splits"][s][m].get(key)) for s, m in cols]
        lines.append(f"| {title} | " + " | ".join(cells) + " |")
    n = ", ".join(f"{s}: {report['splits'][s]['base']['n']}" for s in splits)
    lines += [
        "",
        f"Prompts — {n}. Model {report['model']}, agent {report['agent']}, "
        f"{report['max_new_tokens']} new tokens, greedy.",
        "",
    ]
    lines += ["| target | value | goal | met |", "| --- | --- | --- | --- |"]
    for key, t in report["targets"].items():
        lines.append(f"| {key} | {t['value']} | {t['target']} | {'yes' if t['met'] else 'no'} |")
    for title, key in (("harm category", "by_category"), ("harm keyword", "by_keyword")):
        groups = report.get("harmful_breakdown", {}).get(key)
        if groups:
            lines += ["", f"| harmful refusal (judge) by {title} | n | base | aligned (95 % CI) |",
                      "| --- | --- | --- | --- |"]  # fmt: skip
            for g, modes in groups.items():
                base, al = modes["base"], modes["aligned"]
                ci = _ci(al["judged_refusal_ci95"])
                lines.append(f"| {g} | {base['n']} | {base['judged_refusal_rate']:.1%} | "
                             f"{al['judged_refusal_rate']:.1%} {ci} |")  # fmt: skip
    reach = report.get("reachability")
    if reach:
        lines += [
            "",
            f"Reachability ceiling ({reach['n']} harmful prompts): the share where a refusal "
            "opening is among the candidates token by token (first token only in brackets).",
            "",
            "| top-k | top-p | reachable (95 % CI) | first token | median first-token rank |",
            "| --- | --- | --- | --- | --- |",
        ]
        for st in reach["settings"]:
            lines.append(f"| {st['top_k']} | {st['top_p']} | {st['full']:.1%} "
                         f"{_ci(st['full_ci95'])} | ({st['first_token']:.1%}) | "
                         f"{_fmt('{}', st['median_first_rank'])} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _ci(ci) -> str:
    return "" if not ci else f"[{ci[0]:.0%}, {ci[1]:.0%}]"


def _examples(samples: list[Sample], k: int) -> list[tuple[Sample, Sample]]:
    pairs: dict[tuple[str, str], dict[str, Sample]] = {}
    for s in samples:
        pairs.setdefault((s.split, s.prompt.text), {})[s.mode] = s
    both = [(p["base"], p["aligned"]) for p in pairs.values() if "base" in p and "aligned" in p]
    flipped = [x for x in both if x[0].split == "harmful" and x[1].refused and not x[0].refused]
    benign = [x for x in both if x[0].split == "benign"]
    return flipped[: (k + 1) // 2] + benign[: k // 2]


def run(args: argparse.Namespace) -> int:
    set_threads(args.threads)
    if not args.harmful and not args.benign and not args.alarming:
        raise SystemExit("error: give --harmful, --benign and/or --alarming prompt files")
    lm = load_model(model_config(args))
    path = agent_path(args)
    if path is None:
        raise AgentLoadError(
            "no agent: pass --agent PATH (or use the default model, whose "
            "shipped agent is the default)"
        )
    agent = load_agent(path, expected_hidden_size=lm.hidden_size, device=lm.device)
    cfg = EvalConfig(
        harmful=tuple(args.harmful),
        benign=tuple(args.benign),
        alarming=tuple(args.alarming),
        n_per_file=args.n,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        chunk_size=args.chunk_size,
        seed=args.seed,
        progress=not args.no_progress,
        reachability=args.reachability,
        best_of=args.best_of if args.baselines else 0,
        system_prompt_baseline=args.baselines,
    )
    report, samples = run_eval(lm, agent, cfg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    (out / "eval.md").write_text(table)
    plot_eval(report, out / "eval.png")
    with (out / "samples.jsonl").open("w") as f:
        for s in samples:
            f.write(
                json.dumps(
                    {
                        "split": s.split,
                        "mode": s.mode,
                        "prompt": s.prompt.text,
                        "source": s.prompt.source,
                        "response": s.text,
                        "refused": s.refused,
                        "judge": s.verdict.value,
                        "category": s.prompt.category,
                        "tokens": len(s.token_ids),
                    },
                    ensure_ascii=False,
                )
                + "\n"
            )
    print(table)
    for base, aligned in _examples(samples, args.examples):
        print(f"\n[{base.split}] {base.prompt.text[:200]}")
        print(columns(base.text, aligned.text, ("base", f"aligned ({agent.name})")))
    if args.update_card:
        _update_card(Path(path), report, args)
    print(f"\nwrote {out / 'eval.json'}, eval.md, eval.png, samples.jsonl")
    return 0


def _update_card(agent_path: Path, report: dict, args: argparse.Namespace) -> None:
    card_path = agent_path / CARD_FILE
    if not card_path.is_file():
        raise AgentLoadError(f"--update-card: {agent_path} is not an agent directory with a card")
    card = json.loads(card_path.read_text())
    card["eval"] = {
        "summary": {k: round(v, 4) for k, v in report["summary"].items()},
        "targets": report["targets"],
        "splits": {
            s: {
                m: {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in d.items()
                    if k not in ("nll_sum",)
                }
                for m, d in modes.items()
            }
            for s, modes in report["splits"].items()
        },
        "harmful_files": report["harmful_files"],
        "benign_files": report["benign_files"],
        "alarming_files": report.get("alarming_files", []),
        "harmful_breakdown": report.get("harmful_breakdown", {}),
        **({"reachability": report["reachability"]} if "reachability" in report else {}),
        "n_per_file": report["n_per_file"],
        "max_new_tokens": report["max_new_tokens"],
        "seed": report["seed"],
        "command": args.command_line,
    }
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    print(f"updated {card_path}")
