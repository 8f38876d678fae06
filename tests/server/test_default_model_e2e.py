"""End to end on the embedded default model (SmolLM2-135M-Instruct), loaded by the server's own
lifespan exactly as `mara serve` does with no flags, plus a random agent of the right size."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from mara_serve.engine.agent import AgentCard, AgentNetwork, save_agent
from mara_serve.engine.default_model import DEFAULT_MODEL_NAME
from mara_serve.server.app import create_app
from mara_serve.server.settings import Settings


@pytest.mark.slow
def test_default_model_serves_plain_and_mara_requests(start_server, tmp_path: Path) -> None:
    save_agent(
        AgentNetwork(576, 256),
        AgentCard(name="random", hidden_size=576, inner_dim=256),
        tmp_path / "random",
    )
    settings = Settings(
        api_key="k",
        agent_dir=tmp_path,
        agents={"random": tmp_path / "random"},
        max_concurrent=4,
        device="cpu",
    )
    live = start_server(app=create_app(settings), wait_ready=False)
    live.wait_ready(180)
    client = openai.OpenAI(base_url=live.base_url + "/v1", api_key="k", max_retries=0)
    ids = {m.id for m in client.models.list()}
    assert {DEFAULT_MODEL_NAME, "random"} <= ids

    kwargs = {
        "model": DEFAULT_MODEL_NAME,
        "max_tokens": 12,
        "temperature": 0,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    answer = client.chat.completions.create(**kwargs).choices[0].message.content
    assert "Paris" in answer
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kwargs)
        if c.choices
    )
    assert streamed == answer

    r = client.chat.completions.create(
        **{**kwargs, "model": "random"}, extra_body={"mara_trace": True}
    )
    trace = r.choices[0].model_extra["mara_trace"]
    assert r.choices[0].message.content and len(trace) == r.usage.completion_tokens
    assert any(t["evaluated"] for t in trace), "the agent judged candidates"
