"""Structured-output benchmark: decode tokens/s with a JSON-schema grammar vs without, one run.

    python bench/structured.py [--tokens 32] [--agent PATH]

The engine as served (split matmuls on a CPU in float32), the embedded SmolLM2, 1 and 16 rows,
plain decoding and MARA (the shipped agent): each pair of runs decodes the same prompts with
and without a grammar (llguidance, a JSON object with one free-text field). Only steps in which
every row still runs are timed (tokens/s of a full batch), so answers that end early do not
count against the grammar. Prints a table, the constrained ÷ unconstrained ratios (issue 15's
target: at most 10 % slower at 16 rows) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode import PROMPTS  # noqa: E402

from mara_serve.engine.agent import load_agent  # noqa: E402
from mara_serve.engine.default_model import DEFAULT_AGENT_DIR, default_cache_dir  # noqa: E402
from mara_serve.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from mara_serve.engine.loading import ModelConfig, load_model, render_chat  # noqa: E402
from mara_serve.engine.request import Request  # noqa: E402
from mara_serve.engine.sampling import SamplingParams  # noqa: E402
from mara_serve.server.serving.structured import StructuredOutputs, _schema_grammar  # noqa: E402

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}


def run(engine: LLMEngine, prompts, agent, n_tokens: int, grammar, outputs) -> float:
    """Decode tokens/s after the prefill step (tokens counted as they come)."""
    params = SamplingParams(max_new_tokens=n_tokens, temperature=0.0)
    for i, p in enumerate(prompts):
        constraint = None if grammar is None else outputs.constraint(grammar)
        engine.add_request(Request(f"r{i}", p, params, agent, constraint=constraint))
    engine.step()
    # Only steps where every row still runs count: rows that finish early (a closed JSON object)
    # would otherwise shrink the batch and lower tokens/s for a reason other than the grammar.
    elapsed, tokens = 0.0, 0
    while engine.has_work():
        full = engine.num_running == len(prompts)
        t0 = time.perf_counter()
        n = sum(len(o.new_token_ids) for o in engine.step())
        if full:
            elapsed += time.perf_counter() - t0
            tokens += n
    return tokens / elapsed if elapsed else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--agent", default=str(DEFAULT_AGENT_DIR))
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds (median kept)")
    args = ap.parse_args()
    lm = load_model(ModelConfig(cache_dir=default_cache_dir()))
    agent = load_agent(args.agent, expected_hidden_size=lm.hidden_size)
    outputs = StructuredOutputs(lm.tokenizer, lm.vocab_size, lm.eos_token_ids)
    grammar = outputs._validated(_schema_grammar(SCHEMA, "bench"), "bench")
    ask = " Answer in JSON with one field, answer."
    prompts = [render_chat(lm.tokenizer, [{"role": "user", "content": p + ask}]) for p in PROMPTS]
    engine = LLMEngine(lm, EngineConfig(max_running=16))
    run(engine, prompts[:1], agent, 4, grammar, outputs)  # warm-up
    rows: dict[str, list[float]] = {}
    for _ in range(args.rounds):
        for rows_n in (1, 16):
            for mode, a in (("plain", None), ("mara", agent)):
                for g_name, g in (("free", None), ("json", grammar)):
                    key = f"{mode} b{rows_n} {g_name}"
                    tps = run(engine, prompts[:rows_n], a, args.tokens, g, outputs)
                    rows.setdefault(key, []).append(tps)
    med = {k: sorted(v)[len(v) // 2] for k, v in rows.items()}
    print(f"\n{'run':<20} {'decode tok/s':>12}")
    for k, v in med.items():
        print(f"{k:<20} {v:>12.2f}")
    ratios = {f"{m} b{b} json/free": round(med[f"{m} b{b} json"] / med[f"{m} b{b} free"], 3)
              for m in ("plain", "mara") for b in (1, 16)}  # fmt: skip
    for k, v in ratios.items():
        print(f"{k}: {v}")
    print(json.dumps({"bench": "structured", "tokens": args.tokens, "rounds": args.rounds,
                      "ratios": ratios, "tokens_per_s": {k: round(v, 2) for k, v in med.items()},
                      "torch": torch.__version__, "threads": torch.get_num_threads()}))  # fmt: skip


if __name__ == "__main__":
    main()
