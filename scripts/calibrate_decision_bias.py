"""Pick an agent's decision bias on development prompts, apart from the evaluation sample.

A MARA agent accepts a candidate when p(accept) > 0.5. Shifting the accept logit by a bias b
moves that threshold: b > 0 accepts more (fewer refusals, less over-refusal), b < 0 rejects
more. This script decodes the development prompts once per bias (greedy, short answers — a
refusal is decided in the opening) and prints, per bias, the refusal rates on harmful, benign
and alarming-but-harmless prompts (opening detector and the independent judge), next to the
base model's. With `--write B` it adds B to the agent's accept logit in place and records it
in the card (`decision_bias`), so the served agent is exactly the calibrated one.

Development prompts must not be the evaluation's: `--exclude-eval-sample N` drops, from each
file, the N prompts `mara eval -n N --seed S` samples from it (the rest of a test file is then
a development split of the same distribution; `--alarming` files are not sampled that way:
give one `mara eval` does not use); `--exclude-jsonl` drops prompts the agent was trained on
(a run's demonstrations.jsonl).

  .venv/bin/python scripts/calibrate_decision_bias.py --agent artifacts/run \\
      --harmful data/prompts/BeaverTails/test.json data/prompts/HarmfulQA/test.json \\
      --benign data/prompts/Ultra-Feedback/test.json data/prompts/HHrlhf/train.json \\
      --alarming data/prompts/AlarmingBenign/train.json \\
      --exclude-eval-sample 100 --exclude-jsonl artifacts/run/demonstrations.jsonl \\
      --per-file 75 --biases 0,1,2,3
"""

from __future__ import annotations

import argparse
import copy
import json
import random
from dataclasses import replace
from pathlib import Path

import torch

from mara_serve.engine.agent import ACCEPT, Agent, load_agent, save_agent
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.loading import ModelConfig, load_model, render_chat
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams
from mara_serve.training.data import load_prompts
from mara_serve.training.evaluate import select_prompts
from mara_serve.training.judge import Verdict, judge
from mara_serve.training.refusal import is_refusal


def dev_prompts(files, split, exclude_n, seed, per_file, seen: set[str]) -> list[str]:
    label = "benign" if split == "alarming" else split
    out = []
    for spec in files:
        held = set(seen)
        if exclude_n:
            held |= {p.text for p in select_prompts((spec,), split, exclude_n, seed)}
        texts = [p.text for p in load_prompts(spec, label=label) if p.label == label]
        texts = [t for t in texts if t not in held]
        random.Random(f"dev:{Path(spec).parent.name}/{Path(spec).name}").shuffle(texts)
        out += texts[:per_file]
    return out


def biased(agent: Agent, bias: float) -> Agent:
    """A copy of `agent` with `bias` added to its accept logit."""
    net = copy.deepcopy(agent.network)
    with torch.no_grad():
        net.output_linear.bias[ACCEPT] += bias
    return Agent(net, agent.card, agent.source)


def main() -> None:
    a = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    a.add_argument("--agent", required=True, help="agent directory (agent.safetensors + card)")
    a.add_argument("--harmful", nargs="+", default=[])
    a.add_argument("--benign", nargs="+", default=[])
    a.add_argument("--alarming", nargs="+", default=[])
    a.add_argument("--exclude-eval-sample", type=int, default=0, metavar="N")
    a.add_argument("--seed", type=int, default=0, help="the evaluation's --seed")
    a.add_argument("--exclude-jsonl", nargs="*", default=[], metavar="FILE",
                   help="also drop prompts listed in these JSONL files (e.g. a run's "
                   "demonstrations.jsonl: prompts the agent was trained on)")  # fmt: skip
    a.add_argument("--per-file", type=int, default=75)
    a.add_argument("--biases", default="0,0.5,1,1.5,2")
    a.add_argument("--max-new-tokens", type=int, default=16)
    a.add_argument("--batch-size", type=int, default=32)
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--write", type=float, default=None, metavar="B", help="apply bias B in place")
    args = a.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    agent_dir = Path(args.agent)
    if args.write is not None:
        agent = load_agent(agent_dir)
        total = agent.card.extra.get("decision_bias", 0.0) + args.write
        save_agent(biased(agent, args.write).network,
                   replace(agent.card, extra={**agent.card.extra, "decision_bias": total}),
                   agent_dir)  # fmt: skip
        print(f"added {args.write} to the accept logit of {agent_dir}")
        return

    lm = load_model(ModelConfig(dtype="float32"))
    agent = load_agent(agent_dir, expected_hidden_size=lm.hidden_size)
    seen = {json.loads(line)["prompt"] for f in args.exclude_jsonl for line in open(f)}
    sets = {s: dev_prompts(f, s, args.exclude_eval_sample if s != "alarming" else 0,
                           args.seed, args.per_file, seen)
            for s, f in (("harmful", args.harmful), ("benign", args.benign),
                         ("alarming", args.alarming)) if f}  # fmt: skip
    sets = {s: texts for s, texts in sets.items() if texts}
    biases = [float(x) for x in args.biases.split(",")]
    modes = [("base", None)] + [(f"bias {b:+g}", biased(agent, b)) for b in biases]
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    requests, keys = [], []
    for split, texts in sets.items():
        for i, text in enumerate(texts):
            ids = render_chat(lm.tokenizer, [{"role": "user", "content": text}])
            for name, ag in modes:
                requests.append(Request(f"{split}-{i}-{name}", ids, params, ag))
                keys.append((split, name))
    engine = LLMEngine(lm, EngineConfig(max_running=args.batch_size, max_waiting=len(requests) + 1,
                                        agent_priors=False))  # fmt: skip
    out = engine.generate(requests)
    counts: dict = {}
    for r, key in zip(requests, keys, strict=True):
        text = lm.tokenizer.decode(out[r.request_id][0], skip_special_tokens=True)
        c = counts.setdefault(key, [0, 0, 0])
        c[0] += 1
        c[1] += is_refusal(text)
        c[2] += judge(text) == Verdict.REFUSAL
    print("prompts:", {s: len(t) for s, t in sets.items()})
    print("| mode | " + " | ".join(f"{s} (detector / judge)" for s in sets) + " |")
    print("| --- |" + " --- |" * len(sets))
    for name, _ in modes:
        cells = []
        for s in sets:
            n, det, jud = counts[(s, name)]
            cells.append(f"{100 * det / n:.1f} % / {100 * jud / n:.1f} %")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
