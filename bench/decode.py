"""Decode benchmark: MARA vs plain decoding vs the serial reference vs HF generate, one run.

All rows are measured in this process on the same model and prompts (ratios are what we steer
by; absolute numbers on a shared 2-core CPU are noisy). Every generation runs a fixed number of
new tokens (EOS ignored) so tokens/s compare like with like. Warm-up runs are excluded.

    python bench/decode.py [--quick] [--model M] [--agent PATH] [--chunk-sizes 4,8]

Agents: random agents calibrated on this model's states to reject ~50% ("mixed"), ~10%
("light": how a trained safety agent behaves on benign text) or 100% ("reject-all": the serial
algorithm's worst case, one forward per candidate). Pass --agent to use a real one as "mixed".

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mara_serve.engine.agent import Agent, AgentCard, AgentNetwork, load_agent  # noqa: E402
from mara_serve.engine.default_model import default_cache_dir  # noqa: E402
from mara_serve.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from mara_serve.engine.loading import LoadedModel, ModelConfig, load_model, render_chat  # noqa: E402
from mara_serve.engine.reference import reference_generate  # noqa: E402
from mara_serve.engine.request import Request  # noqa: E402
from mara_serve.engine.sampling import SamplingParams  # noqa: E402

ALL = 256  # chunk size >= top_k: every candidate in one forward
PROMPTS = [
    "Explain how a refrigerator keeps food cold, step by step.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between Python lists and tuples?",
    "Give me a recipe for a vegetarian lasagna.",
    "How do vaccines train the immune system?",
    "Summarise the causes of the French Revolution.",
    "What should I pack for a three-day hiking trip?",
    "Describe the water cycle to a ten-year-old.",
    "How can I improve my sleep quality?",
    "Compare electric cars and petrol cars for a city commuter.",
    "Write a polite email asking my landlord to fix the heating.",
    "What is the Pythagorean theorem and where is it used?",
    "Suggest five names for a coffee shop by the sea.",
    "How does compound interest work?",
    "Explain what a neural network is in simple terms.",
    "What are good habits for learning a new language?",
]


def calibrated_agent(lm: LoadedModel, reject_rate: float, name: str) -> Agent:
    """A random agent whose decisions are sharp and reject about `reject_rate` of the states
    of this model's candidate tokens (1.0 → rejects everything: the serial worst case)."""
    torch.manual_seed(0)
    net = AgentNetwork(lm.hidden_size, 1024)
    with torch.no_grad():
        if reject_rate >= 1.0:
            net.output_linear.weight.zero_()
            net.output_linear.bias.copy_(torch.tensor([10.0, -10.0]))
        else:
            ids = render_chat(lm.tokenizer, [{"role": "user", "content": PROMPTS[0]}])
            out = lm.model.generate(
                torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                output_hidden_states=True, return_dict_in_generate=True,
            )  # fmt: skip
            states = torch.cat([h[-1][0, -1:] for h in out.hidden_states[1:]]).float()
            net.output_linear.weight.mul_(30.0)
            margin = net(states)
            diff = margin[:, 1] - margin[:, 0]
            net.output_linear.bias[1] = -torch.quantile(diff, reject_rate)
    return Agent(net, AgentCard(name, lm.hidden_size))


def engine_run(lm, prompts_ids, agent, n_tokens, **config) -> tuple[float, dict]:
    """Decode tokens/s after the prefill step (all prompts are admitted in the first step), so
    batch sizes and modes compare decode speed; stats also hold end-to-end tokens/s."""
    engine = LLMEngine(lm, EngineConfig(max_running=len(prompts_ids), **config))
    params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True, temperature=0.0)
    for i, ids in enumerate(prompts_ids):
        engine.add_request(Request(str(i), ids, params, agent))
    traces, n_first = [], 0
    t0 = time.perf_counter()
    for out in engine.step():  # prefill of every prompt + the first decode step
        traces += out.traces
    n_first, t1 = len(traces), time.perf_counter()
    while engine.has_work():
        for out in engine.step():
            traces += out.traces
    t2 = time.perf_counter()
    judged = [t for t in traces if t.num_candidates > 1]
    stats = {
        "avg_candidates": sum(t.num_candidates for t in traces) / len(traces),
        "reject_rate": sum(t.rejected for t in judged) / max(1, sum(t.evaluated for t in judged)),
        "fallback_rate": sum(t.fallback for t in traces) / len(traces),
        "e2e_tokens_per_s": len(traces) / (t2 - t0),
    }
    return (len(traces) - n_first) / (t2 - t1), stats


def serial_run(lm, ids, agent, n_tokens) -> float:
    params = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    out, _ = reference_generate(lm.model, ids, agent, params, lm.eos_token_ids)
    return len(out) / (time.perf_counter() - t0)


def hf_generate_run(lm, ids, n_tokens) -> float:
    x = torch.tensor([ids], device=lm.device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = lm.model.generate(x, max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                do_sample=False, pad_token_id=lm.eos_token_ids[0])  # fmt: skip
    return (out.shape[1] - len(ids)) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 3 min on 2 cores)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--agent", default=None, help="a real agent to use as the 'mixed' agent")
    ap.add_argument("--chunk-sizes", default="2,8", help="other chunk sizes to measure")
    ap.add_argument(
        "--no-split-matmuls",
        action="store_true",
        help="the engine's projections as plain F.linear (the CPU float32 default splits them)",
    )
    args = ap.parse_args()
    n1, n16, n_serial = (24, 16, 12) if args.quick else (96, 64, 32)
    lm = load_model(ModelConfig(model=args.model, cache_dir=default_cache_dir()))
    # The engine as served (split matmuls on a CPU in float32) unless --no-split-matmuls.
    run = functools.partial(engine_run, split_matmuls=not args.no_split_matmuls)
    prompts = [render_chat(lm.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    mixed = (load_agent(args.agent, expected_hidden_size=lm.hidden_size) if args.agent
             else calibrated_agent(lm, 0.5, "mixed-50%"))  # fmt: skip
    light = calibrated_agent(lm, 0.1, "light-10%")
    high = calibrated_agent(lm, 1.0, "reject-all")
    one = prompts[:1]
    run(lm, one, mixed, 4)  # warm-up (allocations, first-call overheads)
    hf_generate_run(lm, one[0], 4)

    rows: dict[str, tuple[float, dict]] = {}
    chunks = [int(x) for x in args.chunk_sizes.split(",") if x]
    rows["plain b1"] = run(lm, one, None, n1)
    rows["mara mixed b1"] = run(lm, one, mixed, n1)
    rows["mara mixed b1 all-at-once"] = run(lm, one, mixed, n1, chunk_size=ALL,
                                                   probe_top1=False)  # fmt: skip
    rows["mara light b1"] = run(lm, one, light, n1)
    rows["mara light b1 all-at-once"] = run(lm, one, light, n1, chunk_size=ALL,
                                                   probe_top1=False)  # fmt: skip
    rows["mara reject-all b1"] = run(lm, one, high, n1)
    for m in chunks:
        rows[f"mara mixed b1 chunk={m} no-probe"] = run(lm, one, mixed, n1, chunk_size=m,
                                                              probe_top1=False)  # fmt: skip
    rows["hf generate b1"] = (hf_generate_run(lm, one[0], n1), {})
    rows["serial mixed b1"] = (serial_run(lm, one[0], mixed, n_serial), {})
    rows["serial reject-all b1"] = (serial_run(lm, one[0], high, n_serial), {})
    rows["plain b16"] = run(lm, prompts, None, n16)
    rows["mara mixed b16"] = run(lm, prompts, mixed, n16)
    rows["mara mixed b16 all-at-once"] = run(lm, prompts, mixed, n16, chunk_size=ALL,
                                                    probe_top1=False)  # fmt: skip
    rows["mara light b16"] = run(lm, prompts, light, n16)
    # the engine before undecided rows went on to the next step: rounds until all rows decide
    rows["mara mixed b16 rounds-in-step"] = run(lm, prompts, mixed, n16, defer_undecided=False)
    rows["mara light b16 rounds-in-step"] = run(lm, prompts, light, n16, defer_undecided=False)
    for m in chunks:
        rows[f"mara mixed b16 chunk={m} no-probe"] = run(
            lm, prompts, mixed, n16, chunk_size=m, probe_top1=False
        )

    print(f"\n{'run':<30} {'decode t/s':>10} {'e2e t/s':>8} {'cands':>6} {'reject':>7} "
          f"{'fallback':>9}")  # fmt: skip
    for name, (tps, st) in rows.items():
        extra = (f"{st['e2e_tokens_per_s']:>8.2f} {st['avg_candidates']:>6.1f} "
                 f"{st['reject_rate']:>7.2f} {st['fallback_rate']:>9.2f}") if st else (
                 f"{tps:>8.2f}")  # fmt: skip
        print(f"{name:<30} {tps if st else float('nan'):>10.2f} {extra}")
    r = {k: v[0] for k, v in rows.items()}  # decode t/s (engine rows), e2e t/s (others)
    e2e = {k: v[1].get("e2e_tokens_per_s", v[0]) for k, v in rows.items()}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    result = {
        "mara_vs_plain": r["mara mixed b1"] / r["plain b1"],
        "mara_vs_plain_light": r["mara light b1"] / r["plain b1"],
        "mara_vs_plain_high_rejection": r["mara reject-all b1"] / r["plain b1"],
        # end to end (prefill included on both sides) against the reference and HF generate
        "mara_vs_serial": e2e["mara reject-all b1"] / e2e["serial reject-all b1"],
        "mara_vs_serial_mixed": e2e["mara mixed b1"] / e2e["serial mixed b1"],
        "plain_vs_hf_generate": e2e["plain b1"] / e2e["hf generate b1"],
        "batch16_vs_batch1": r["mara mixed b16"] / r["mara mixed b1"],
        "batch16_vs_batch1_light": r["mara light b16"] / r["mara light b1"],
        "batch16_vs_batch1_plain": r["plain b16"] / r["plain b1"],
        "mara_vs_plain_b16": r["mara mixed b16"] / r["plain b16"],
        "mara_vs_plain_b16_light": r["mara light b16"] / r["plain b16"],
        "undecided_rows_gain_b16": r["mara mixed b16"] / r["mara mixed b16 rounds-in-step"],
        "undecided_rows_gain_b16_light": r["mara light b16"] / r["mara light b16 rounds-in-step"],
        "tokens_per_s": r,
        "model": lm.name, "device": str(lm.device), "dtype": str(lm.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "commit": commit,
        "quick": args.quick, "split_matmuls": not args.no_split_matmuls,
    }  # fmt: skip
    summary = {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
    summary["tokens_per_s"] = {k: round(v, 2) for k, v in r.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
