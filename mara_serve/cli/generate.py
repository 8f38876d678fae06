"""`mara generate`: one prompt through the engine (or the serial reference), as text or JSON."""

from __future__ import annotations

import argparse

from mara_serve.cli.common import (
    add_agent_arg,
    add_model_args,
    agent_path,
    columns,
    dumps,
    model_config,
    new_id,
)
from mara_serve.engine.agent import Agent, load_agent
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.loading import LoadedModel, load_model, render_chat
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request, TokenTrace
from mara_serve.engine.sampling import SamplingParams


def add_parser(sub) -> None:  # sub: the `mara` parser's subparsers
    g = sub.add_parser("generate", help="generate one answer (base, aligned, or both)")
    add_model_args(g)
    add_agent_arg(g)
    g.add_argument("--no-agent", action="store_true", help="plain decoding, no agent")
    g.add_argument("--prompt", required=True, help="the user message")
    g.add_argument("--system", default=None, help="optional system message")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--top-k", type=int, default=None, help="candidates per step (MARA: 40)")
    g.add_argument("--top-p", type=float, default=None, help="candidate nucleus (MARA: 0.95)")
    g.add_argument("--compare", action="store_true", help="base and aligned answers side by side")
    g.add_argument("--trace", action="store_true", help="print the per-token accept/reject trace")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.add_argument(
        "--reference",
        action="store_true",
        help="decode with the serial reference algorithm (slow; for checking)",
    )
    g.set_defaults(run=run)


def _resolve_agent(args: argparse.Namespace, lm: LoadedModel) -> Agent | None:
    if args.no_agent:
        return None
    path = agent_path(args)
    if path is None:
        return None
    return load_agent(path, expected_hidden_size=lm.hidden_size, device=lm.device)


def _result(lm: LoadedModel, ids: list[int], traces: list[TokenTrace], reason: str) -> dict:
    tok = lm.tokenizer
    return {
        "text": tok.decode(ids, skip_special_tokens=True),
        "token_ids": ids,
        "finish_reason": reason,
        "trace": [dict(t.to_json(), token=tok.decode([t.token_id]),
                       candidate_tokens=[tok.decode([c]) for c in t.candidates])
                  for t in traces],
    }  # fmt: skip


def _decode(lm, prompt_ids, agents: dict[str, Agent | None], params, reference: bool) -> dict:
    if reference:
        out = {}
        for label, agent in agents.items():
            ids, traces = reference_generate(lm.model, prompt_ids, agent, params, lm.eos_token_ids)
            reason = "stop" if ids and ids[-1] in lm.eos_token_ids else "length"
            out[label] = _result(lm, ids, traces, reason)
        return out
    engine = LLMEngine(lm, EngineConfig(max_running=max(1, len(agents))))
    reqs = {label: Request(new_id(), prompt_ids, params, agent) for label, agent in agents.items()}
    results = engine.generate(list(reqs.values()))
    return {label: _result(lm, *results[r.request_id]) for label, r in reqs.items()}


def _print_trace(result: dict) -> None:
    """One line per token where the agent rejected something."""
    for i, t in enumerate(result["trace"]):
        if not t["rejected"]:
            continue
        rejected = t["candidate_tokens"][: t["rejected"]]
        how = "FALLBACK to top-1" if t["fallback"] else f"accepted rank {t['accepted_rank']}"
        p = "" if t["accept_prob"] is None else f" (p_accept {t['accept_prob']:.2f})"
        print(
            f"  #{i:<4} {t['token']!r:<16} {how}{p} of {t['num_candidates']}; rejected {rejected!r}"
        )


def run(args: argparse.Namespace) -> int:
    lm = load_model(model_config(args))
    agent = _resolve_agent(args, lm)
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    prompt_ids = render_chat(lm.tokenizer, messages)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, top_k=args.top_k,
                            top_p=args.top_p, temperature=0.0)  # fmt: skip
    if args.compare:
        if agent is None:
            raise SystemExit("error: --compare needs an agent (--agent PATH)")
        agents = {"base": None, "aligned": agent}
    else:
        agents = {"aligned" if agent else "base": agent}
    out = _decode(lm, prompt_ids, agents, params, args.reference)
    if args.json:
        print(dumps(out if args.compare else next(iter(out.values()))))
        return 0
    if args.compare:
        print(columns(out["base"]["text"], out["aligned"]["text"],
                      (f"base ({lm.name})", f"aligned (agent {agent.name})")))  # fmt: skip
    else:
        print(next(iter(out.values()))["text"])
    if args.trace and agent is not None:
        res = out["aligned"]
        judged = sum(1 for t in res["trace"] if t["num_candidates"] > 1)
        fallbacks = sum(t["fallback"] for t in res["trace"])
        rejections = sum(t["rejected"] for t in res["trace"])
        print(
            f"\ntrace: {len(res['trace'])} tokens, {judged} judged by the agent, "
            f"{rejections} candidates rejected, {fallbacks} fallbacks"
        )
        _print_trace(res)
    return 0
