"""End to end on the embedded default model (SmolLM2-135M-Instruct) through the `mara` CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from parity_policy import check_against_reference

from mara_serve.engine.agent import AgentCard, AgentNetwork, load_agent, save_agent
from mara_serve.engine.default_model import DEFAULT_AGENT_DIR, default_cache_dir
from mara_serve.engine.engine import EngineConfig, LLMEngine
from mara_serve.engine.loading import ModelConfig, load_model, render_chat
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.request import Request
from mara_serve.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def default_lm():
    """float32: where the engine must equal the reference token for token."""
    return load_model(ModelConfig(cache_dir=default_cache_dir(), dtype="float32"))


def mara(*args: str) -> dict:
    cli = Path(sys.executable).parent / "mara"
    proc = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plain_generate_equals_transformers_greedy(default_lm):
    out = mara("generate", "--no-agent", "--prompt", PROMPT, "--max-new-tokens", "12", "--json",
               "--dtype", "float32")  # fmt: skip
    ids = render_chat(default_lm.tokenizer, [{"role": "user", "content": PROMPT}])
    assert ids[:2] != [1, 1]  # the template's leading special token is not doubled
    with torch.inference_mode():
        want = default_lm.model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert out["token_ids"] == want[0, len(ids) :].tolist()
    assert out["text"] and out["finish_reason"] in ("stop", "length")


def test_compare_json_gives_base_and_aligned_matching_the_reference(default_lm, tmp_path):
    torch.manual_seed(0)
    net = AgentNetwork(default_lm.hidden_size, 256)
    with torch.no_grad():
        net.output_linear.weight.mul_(50)
    agent_dir = save_agent(net, AgentCard("rand", default_lm.hidden_size, 256), tmp_path / "a")
    out = mara("generate", "--agent", str(agent_dir), "--prompt", PROMPT,
               "--max-new-tokens", "10", "--compare", "--json", "--dtype", "float32")  # fmt: skip
    assert set(out) == {"base", "aligned"}
    ids = render_chat(default_lm.tokenizer, [{"role": "user", "content": PROMPT}])
    agent = load_agent(agent_dir)
    params = SamplingParams(max_new_tokens=10)
    eos = default_lm.eos_token_ids
    want, traces = reference_generate(default_lm.model, ids, agent, params, eos)
    assert out["aligned"]["token_ids"] == want
    assert [t["accepted_rank"] for t in out["aligned"]["trace"]] == [
        t.accepted_rank for t in traces
    ]
    assert len(out["aligned"]["trace"]) == len(out["aligned"]["token_ids"])


def test_default_precision_follows_the_reference_up_to_near_ties():
    """The default precision (bfloat16 on a CPU with native bf16) on the real model and the
    shipped agent: the engine's tokens equal the reference's in the same dtype, or leave them
    only at a near-tie (tests/parity_policy.py)."""
    lm = load_model(ModelConfig(cache_dir=default_cache_dir()))
    if lm.dtype == torch.float32:
        pytest.skip("this CPU has no native bf16: the default precision is float32")
    agent = load_agent(DEFAULT_AGENT_DIR, expected_hidden_size=lm.hidden_size)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    texts = [PROMPT, "How do I pick a lock?", "Write a haiku about rain.", "How do I make a bomb?"]
    reqs = [
        Request(f"{i}-{a is None}", render_chat(lm.tokenizer, [{"role": "user", "content": t}]),
                params, a)
        for i, t in enumerate(texts) for a in (None, agent)
    ]  # fmt: skip
    results = LLMEngine(lm, EngineConfig(max_running=8)).generate(reqs)
    diverged = 0
    for r in reqs:
        want, _ = reference_generate(lm.model, r.prompt_token_ids, r.agent, params,
                                     lm.eos_token_ids)  # fmt: skip
        got = results[r.request_id][0]
        margins = check_against_reference(lm.model, lm.dtype, r.prompt_token_ids, r.agent,
                                          params, got, want)  # fmt: skip
        diverged += margins is not None
    assert diverged <= len(reqs) // 4, f"{diverged}/{len(reqs)} requests left the reference"


def test_bad_agent_file_is_a_clear_cli_error(tmp_path):
    bad = tmp_path / "bad_actor.pth"
    bad.write_bytes(b"not a checkpoint")
    cli = Path(sys.executable).parent / "mara"
    proc = subprocess.run([str(cli), "generate", "--agent", str(bad), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr
