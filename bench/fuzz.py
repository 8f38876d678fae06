"""Long schema-fuzzing run (`make fuzz`): schemathesis against a live `mara serve`.

The short, deterministic version runs in the test suite (tests/reliability/test_fuzz.py); this
one runs every schemathesis phase (coverage: boundary values of every field; fuzzing: random
valid and invalid requests; stateful: load/list/unload sequences of the admin API) with many
more examples, over every route of /openapi.json, with all checks except
`positive_data_acceptance` (the schema cannot say that e.g. `logprobs` is refused) plus one of
ours: every error is an OpenAI error object. Valid cases are steered as in the test: a third
name the base model, a third the agent, and most drop the fields the server refuses, so random
sampling settings reach the engine.

The server runs the tiny random model (hidden 64) with an admin key and no API key (/v1 open;
auth is tested elsewhere), a 10 s request timeout and 48 chat tokens by default.

    python bench/fuzz.py                      # 300 examples per route and phase, seed 1
    python bench/fuzz.py --max-examples 1000 --seed 7

Prints schemathesis's report, a table of statuses per route, the verdict, then one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import schemathesis
import schemathesis.cli

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import ServeProcess, environment, tiny_agents, tiny_model  # noqa: E402

ADMIN_KEY = "fuzz-admin-key"
MAX_TOKENS = 48
MODELS = ["tiny-llama", "a", None]
AGENT_PATHS = ["a", "b", "a/agent.json", None]
REFUSED = (
    "logprobs", "top_logprobs", "tools", "tool_choice", "response_format", "suffix", "best_of",
    "frequency_penalty", "presence_penalty", "logit_bias", "stream_options",
)  # fmt: skip
STATUSES: dict[str, Counter] = defaultdict(Counter)
ERROR_KEYS = {"message", "type", "param", "code"}


def plausible_prompt(prompt: Any) -> Any:
    """Token ids folded into the vocabulary, empty texts filled: the prompt reaches the engine."""
    if isinstance(prompt, bool):
        return prompt
    if isinstance(prompt, int):
        return abs(prompt) % 1000
    if isinstance(prompt, str):
        return prompt or "hi"
    if isinstance(prompt, list):
        return [plausible_prompt(p) for p in prompt] or "hi"
    return prompt


def register_hooks() -> None:
    """Steering (valid cases only), per-route status counts, and the OpenAI-error check."""
    counter = itertools.count()

    @schemathesis.hook
    def map_case(context: Any, case: Any) -> Any:
        if case.meta is not None and case.meta.generation.mode.is_negative:
            return case
        i, body = next(counter), case.body
        if not isinstance(body, dict):
            return case
        if "model" in body and MODELS[i % 3] is not None:
            body["model"] = MODELS[i % 3]
        if "path" in body and AGENT_PATHS[i % 4] is not None:
            body["path"] = AGENT_PATHS[i % 4]
        if "model" in body and i % 4 != 3:
            for name in REFUSED:
                body.pop(name, None)
            for name in ("max_tokens", "max_completion_tokens"):
                if isinstance(body.get(name), int) and body[name] > MAX_TOKENS:
                    body[name] = MAX_TOKENS
            for message in body.get("messages") or []:
                if isinstance(message, dict) and message.get("content") is None:
                    message["content"] = "hi"
            if "prompt" in body:
                body["prompt"] = plausible_prompt(body["prompt"])
        return case

    @schemathesis.hook
    def after_call(context: Any, case: Any, response: Any) -> None:
        STATUSES[f"{case.method.upper()} {case.operation.path}"][response.status_code] += 1

    @schemathesis.check
    def openai_error_object(ctx: Any, response: Any, case: Any) -> bool | None:
        """A non-2xx answer (the probes aside) is exactly OpenAI's error object."""
        if response.status_code < 400 or case.operation.path in ("/health", "/ready"):
            return None
        body = json.loads(response.content)
        if set(body) != {"error"} or set(body["error"]) != ERROR_KEYS:
            raise AssertionError(f"not an OpenAI error object: {response.content[:200]!r}")
        return True


def run_schemathesis(url: str, args: Any, tmp: Path) -> int:
    # No crash cache in the working tree (.schemathesis/): the run is seeded, hence repeatable.
    config = tmp / "schemathesis.toml"
    config.write_text("[cache]\nenabled = false\n")
    cli_args = [
        "--config-file", str(config), "run", url + "/openapi.json",
        "-H", f"Authorization: Bearer {ADMIN_KEY}",
        "--checks", "all", "--exclude-checks", "positive_data_acceptance",
        "--max-examples", str(args.max_examples), "--seed", str(args.seed), "-w", "1",
        "--phases", "coverage,fuzzing,stateful", "--request-timeout", "30",
        "--max-response-time", "30",  # the server's own timeout is 10 s
        "--suppress-health-check", "all", "--max-failures", "50",
    ]  # fmt: skip
    if args.max_time:
        cli_args += ["--max-time", str(args.max_time)]
    try:
        schemathesis.cli.schemathesis.main(args=cli_args, standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=300, help="per route and phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-time", type=int, default=None, help="seconds for the whole run")
    args = parser.parse_args()
    started = time.monotonic()
    register_hooks()
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_model(Path(tmp) / "tiny-llama")
        agent_dir = Path(tmp) / "agents"
        tiny_agents(agent_dir)
        server = ServeProcess([
            "--model", str(model), "--log-level", "warning", "--agent-dir", str(agent_dir),
            "--agent", f"a={agent_dir / 'a'}", "--request-timeout-s", "10",
            "--max-tokens-default", str(MAX_TOKENS), "--max-request-body-bytes", "65536",
        ], env={"MARA_ADMIN_KEY": ADMIN_KEY})  # fmt: skip
        try:
            server.wait_ready()
            exit_code = run_schemathesis(server.url, args, Path(tmp))
            tracebacks = server.tracebacks()
        finally:
            server_exit = server.stop()
    rows = {op: dict(sorted(c.items())) for op, c in sorted(STATUSES.items())}
    calls = sum(sum(c.values()) for c in STATUSES.values())
    five_xx = sum(n for c in STATUSES.values() for s, n in c.items() if s >= 500)
    print(f"\n{'route':<30} {'calls':>6} {'2xx':>6} {'4xx':>6} {'5xx':>4}   statuses")
    probes = {op: c for op, c in rows.items() if set(c) == {405}}  # unsupported-method probes
    table = [(op, c) for op, c in rows.items() if op not in probes]
    table.append(
        (f"{len(probes)} undocumented methods", sum(map(Counter, probes.values()), Counter()))
    )
    for op, c in table:
        by: Counter = Counter()
        for status, n in c.items():
            by[status // 100] += n
        print(f"{op:<30} {sum(c.values()):>6} {by[2]:>6} {by[4]:>6} {by[5]:>4}   {dict(c)}")
    verdict = exit_code == 0 and five_xx == 0 and tracebacks == 0 and server_exit == 0
    print(f"schemathesis exit status {exit_code}; requests {calls}; 5xx {five_xx}; server "
          f"tracebacks {tracebacks}; server exit status {server_exit}")  # fmt: skip
    print("PASS" if verdict else "FAIL")
    print(json.dumps({
        "bench": "fuzz", "max_examples": args.max_examples, "seed": args.seed,
        "requests": calls, "five_xx": five_xx, "schemathesis_exit": exit_code,
        "tracebacks": tracebacks, "server_exit": server_exit, "pass": verdict,
        "statuses": {op: {str(s): n for s, n in c.items()} for op, c in rows.items()},
        **environment(), "wall_s": round(time.monotonic() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
