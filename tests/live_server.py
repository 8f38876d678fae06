"""The HTTP tiers' fixtures (tests/server, tests/reliability, tests/ui import them from here): a
tiny random Llama with the real SmolLM2 tokenizer, tiny agents in an agent directory, and live
uvicorn servers on 127.0.0.1 (random free ports).

The model is random but peaked (large init), so greedy decoding has clear margins and batched
decoding gives the same tokens as a request alone; the 'half' agent rejects about half of the
candidate states, sharply (decisions far from 0.5), so MARA parity with the serial reference is
exact. A whole session builds the model once (~1 s).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import uvicorn

from mara_serve.engine.agent import AgentCard, AgentNetwork, save_agent
from mara_serve.engine.async_engine import AsyncEngine
from mara_serve.engine.default_model import default_cache_dir, ensure_default_model
from mara_serve.engine.engine import LLMEngine
from mara_serve.engine.loading import LoadedModel, ModelConfig, load_model
from mara_serve.server.app import create_app
from mara_serve.server.lifecycle import engine_config
from mara_serve.server.settings import Settings

API_KEY = "test-api-key"
ADMIN_KEY = "test-admin-key"
HIDDEN = 64


def build_tiny_model(out: Path, seed: int = 0, context: int = 512) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = ensure_default_model(default_cache_dir())
    tokenizer = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=context,
        tie_word_embeddings=True,
        initializer_range=0.5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_agent_network(lm: LoadedModel | None, mode: str, seed: int) -> AgentNetwork:
    """'half': rejects ~half of the model's states, sharply; 'reject': rejects everything."""
    torch.manual_seed(seed)
    net = AgentNetwork(HIDDEN, 64)
    with torch.no_grad():
        if mode == "reject":
            net.output_linear.weight.zero_()
            net.output_linear.bias.copy_(torch.tensor([10.0, -10.0]))
            return net
        assert lm is not None
        ids = torch.randint(0, lm.vocab_size, (8, 32))
        states = lm.model.model(ids).last_hidden_state.reshape(-1, HIDDEN).float()
        net.output_linear.weight.mul_(200.0)
        net.output_linear.bias.zero_()
        logits = net(states)
        net.output_linear.bias[1] = -(logits[:, 1] - logits[:, 0]).median()
    return net


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny model with a 4096-token context (streams that outlast a grace period)."""
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", context=4096)


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path) -> LoadedModel:
    # float32: the HTTP tiers compare answers token for token (batched vs alone, vs reference)
    return load_model(ModelConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))


@pytest.fixture(scope="session")
def agent_dir(tmp_path_factory: pytest.TempPathFactory, tiny_lm: LoadedModel) -> Path:
    """half/, half2/ (another seed), reject/, and wrong-size/ (hidden 32)."""
    d = tmp_path_factory.mktemp("agents")
    for name, mode, seed in (("half", "half", 1), ("half2", "half", 2), ("reject", "reject", 0)):
        card = AgentCard(name=name, hidden_size=HIDDEN, inner_dim=64, description=f"{mode} agent")
        save_agent(make_agent_network(tiny_lm, mode, seed), card, d / name)
    save_agent(
        AgentNetwork(32, 64),
        AgentCard(name="wrong", hidden_size=32, inner_dim=64),
        d / "wrong-size",
    )
    return d


@dataclass
class LiveServer:
    """A uvicorn server on 127.0.0.1 in a background thread (no signal handlers), with the
    helpers tests need."""

    app: Any
    base_url: str = ""
    _server: uvicorn.Server | None = None
    _thread: threading.Thread | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def state(self) -> Any:
        return self.app.state.mara

    @property
    def api_key(self) -> str | None:
        key = self.state.settings.api_key
        return None if key is None else key.get_secret_value()

    @property
    def admin_key(self) -> str | None:
        key = self.state.settings.admin_key
        return None if key is None else key.get_secret_value()

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @property
    def admin_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_key}"}

    def post(self, path: str, body: Any, **kwargs: Any) -> httpx.Response:
        kwargs.setdefault("headers", self.auth)
        return httpx.post(self.base_url + path, json=body, timeout=60, **kwargs)

    def sse(self, path: str, body: dict[str, Any]) -> list[Any]:
        """POST a streaming request; the decoded `data:` payloads ("[DONE]" kept as a str)."""
        events: list[Any] = []
        with httpx.stream(
            "POST", self.base_url + path, json=body, headers=self.auth, timeout=60
        ) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-request-id"]
            for line in r.iter_lines():
                if not line:
                    continue
                assert line.startswith("data: "), line
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
        return events

    def start(self, wait_ready: bool = True) -> LiveServer:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 60
        while not self._server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while httpx.get(self.base_url + "/ready").status_code != 200:
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.02)

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's value from /metrics (0 if absent)."""
        text = httpx.get(self.base_url + "/metrics").text
        return metric_value(text, name, labels)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    want = {f'{k}="{v}"' for k, v in (labels or {}).items()}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, label_str = key.partition("{")
        if metric != name:
            continue
        have = set(label_str.rstrip("}").split(",")) if label_str else set()
        if want <= have:
            return float(value)
    return 0.0


def _start(lm: LoadedModel, settings: Settings, wait_ready: bool = True) -> LiveServer:
    """A live server on `lm`, its engine configured from `settings` exactly as `mara serve`."""
    engine = AsyncEngine(LLMEngine(lm, engine_config(settings)))
    return LiveServer(create_app(settings, engine)).start(wait_ready=wait_ready)


@pytest.fixture(scope="session")
def server(tiny_lm: LoadedModel, agent_dir: Path) -> Iterator[LiveServer]:
    """The shared server: API and admin keys, agent 'half' loaded at start, small limits."""
    settings = Settings(
        api_key=API_KEY,
        admin_key=ADMIN_KEY,
        agent_dir=agent_dir,
        agents={"half": agent_dir / "half"},
        max_concurrent=16,
        max_waiting=64,
        max_request_body_bytes=64 * 1024,
        max_n=4,
        max_stop=4,
        max_messages=64,
    )
    live = _start(tiny_lm, settings)
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Any:
    """The real openai SDK against the shared server."""
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture()
def start_server(tiny_lm: LoadedModel) -> Iterator[Callable[..., LiveServer]]:
    """Factory for a test's own server on the tiny model (stopped after the test):
    `start_server(**settings)`, or `start_server(settings=..., app=...)` for a custom app."""
    started: list[LiveServer] = []

    def start(app: Any = None, wait_ready: bool = True, **settings: Any) -> LiveServer:
        if app is not None:
            live = LiveServer(app).start(wait_ready=wait_ready)
        else:
            live = _start(tiny_lm, Settings(**settings), wait_ready)
        started.append(live)
        return live

    yield start
    for live in started:
        live.stop()


@pytest.fixture()
def scratch_agent_dir(agent_dir: Path, tmp_path: Path) -> Path:
    """A writable copy of a test's own agents, inside the shared server's agent dir."""
    d = agent_dir / f"scratch-{tmp_path.name}"
    d.mkdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)
