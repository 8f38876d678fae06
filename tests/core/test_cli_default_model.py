"""End to end on the embedded default model (SmolLM2-135M-Instruct) through the `mara` CLI."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mara_serve.engine.agent import AgentCard, AgentNetwork, save_agent
from mara_serve.engine.default_model import default_cache_dir
from mara_serve.engine.loading import ModelConfig, load_model, render_chat
from mara_serve.engine.reference import reference_generate
from mara_serve.engine.sampling import SamplingParams

pytestmark = pytest.mark.slow
PROMPT = "Name three primary colors."


@pytest.fixture(scope="module")
def default_lm():
    return load_model(ModelConfig(cache_dir=default_cache_dir()))


def mara(*args: str) -> dict:
    cli = Path(sys.executable).parent / "mara"
    proc = subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_plain_generate_equals_transformers_greedy(default_lm):
    out = mara("generate", "--no-agent", "--prompt", PROMPT, "--max-new-tokens", "12", "--json")
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
               "--max-new-tokens", "10", "--compare", "--json")  # fmt: skip
    assert set(out) == {"base", "aligned"}
    ids = render_chat(default_lm.tokenizer, [{"role": "user", "content": PROMPT}])
    from mara_serve.engine.agent import load_agent

    agent = load_agent(agent_dir)
    params = SamplingParams(max_new_tokens=10)
    eos = default_lm.eos_token_ids
    want, traces = reference_generate(default_lm.model, ids, agent, params, eos)
    assert out["aligned"]["token_ids"] == want
    assert [t["accepted_rank"] for t in out["aligned"]["trace"]] == [
        t.accepted_rank for t in traces
    ]
    assert len(out["aligned"]["trace"]) == len(out["aligned"]["token_ids"])


def test_bad_agent_file_is_a_clear_cli_error(tmp_path):
    bad = tmp_path / "bad_actor.pth"
    bad.write_bytes(b"not a checkpoint")
    cli = Path(sys.executable).parent / "mara"
    proc = subprocess.run([str(cli), "generate", "--agent", str(bad), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "corrupt or truncated" in proc.stderr
