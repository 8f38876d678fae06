"""`--model ORG/NAME` not in the local cache is downloaded from the Hub's file API — here a
stand-in served over HTTP at `HF_ENDPOINT` from the tiny model's directory (it lives in the
training tests for their saved tiny model). Loading runs in a subprocess with a fresh `HF_HOME`,
as a user's first start would."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    """The Hub's `resolve` file API for repos made of local directories; counts requests."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.requests = repos, []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _serve(self, body: bool) -> None:
                hub.requests.append(self.path)
                parts = self.path.split("?")[0].strip("/").split("/")
                # /{org}/{name}/resolve/{revision}/{file...}
                repo = "/".join(parts[:2])
                if len(parts) < 5 or parts[2] != "resolve" or repo not in hub.repos:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "RepoNotFound")
                    self.end_headers()
                    return
                path = hub.repos[repo].joinpath(*parts[4:])
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.end_headers()
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", '"' + hashlib.sha256(data).hexdigest() + '"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def do_HEAD(self):  # noqa: N802
                self._serve(False)

            def do_GET(self):  # noqa: N802
                self._serve(True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


LOAD = (
    "import sys; from mara_serve.engine.loading import ModelConfig, load_model\n"
    "from mara_serve.engine.errors import ModelLoadError\n"
    "try:\n"
    "    rev = sys.argv[2] if len(sys.argv) > 2 else None\n"
    "    lm = load_model(ModelConfig(model=sys.argv[1], revision=rev, device='cpu',\n"
    "                                dtype='float32'))\n"
    "    print('LOADED', lm.name, lm.hidden_size)\n"
    "except ModelLoadError as e:\n"
    "    print('ERROR', str(e).replace(chr(10), ' '))\n"
)


def load(model: str, endpoint: str, home: Path, offline: bool = False, *rev: str) -> str:
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(home),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "1" if offline else "0"}  # fmt: skip
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", LOAD, model, *rev], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def hub(tiny_model_dir, tmp_path):
    bin_only = tmp_path / "bin-only"
    bin_only.mkdir()
    (bin_only / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    (bin_only / "pytorch_model.bin").write_bytes(b"not loaded")
    server = FakeHub({"acme/tiny": tiny_model_dir, "acme/bin-only": bin_only})
    yield server
    server.close()


def test_a_hub_model_is_downloaded_once_then_loads_from_the_cache(hub, tmp_path):
    home = tmp_path / "hf-home"
    assert load("acme/tiny", hub.url, home) == "LOADED acme/tiny 64"
    fetched = {p.split("/resolve/main/")[-1] for p in hub.requests}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= fetched
    assert not any(p.endswith(".bin") for p in fetched)
    hub.requests.clear()
    hub.close()  # the hub is gone: the second start needs only the cache
    assert load("acme/tiny", hub.url, home) == "LOADED acme/tiny 64"
    assert load("acme/tiny", hub.url, home, offline=True) == "LOADED acme/tiny 64"


def test_a_revision_is_fetched_by_name(hub, tmp_path):
    assert load("acme/tiny", hub.url, tmp_path / "home", False, "v1.0") == "LOADED acme/tiny 64"
    files = [p for p in hub.requests if "/resolve/" in p]
    assert files and all("/resolve/v1.0/" in p for p in files)


def test_hub_errors_are_clear(hub, tmp_path):
    home = tmp_path / "hf-home"
    missing = load("acme/missing", hub.url, home)
    assert missing.startswith("ERROR") and "not found" in missing
    pickled = load("acme/bin-only", hub.url, home)
    assert pickled.startswith("ERROR") and "safetensors" in pickled
    offline = load("acme/other", hub.url, home, offline=True)
    assert offline.startswith("ERROR") and "HF_HUB_OFFLINE" in offline
    assert json.dumps(hub.requests)  # the stand-in was asked (not a local failure)


AGENT = (
    "import sys; from mara_serve.engine.agent import load_agent\n"
    "from mara_serve.engine.errors import AgentLoadError\n"
    "try:\n"
    "    a = load_agent(sys.argv[1], expected_hidden_size=64)\n"
    "    print('LOADED', a.name, a.hidden_size)\n"
    "except AgentLoadError as e:\n"
    "    print('ERROR', str(e).replace(chr(10), ' '))\n"
)


def test_agents_from_the_hub(tmp_path):
    """`hf://ORG/REPO/PATH`: an agent directory (ours) and an authors' `.pth` file."""
    import torch
    from tiny_models import make_agent

    from mara_serve.engine.agent import AgentCard, save_agent

    repo = tmp_path / "agents-repo"
    agent = make_agent("accept")
    save_agent(agent.network, AgentCard("hub-safety", 64), repo / "safety")
    torch.save(agent.network.state_dict(), repo / "authors_actor.pth")
    hub = FakeHub({"acme/agents": repo})
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "home"),
           "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0"}  # fmt: skip
    try:

        def run(spec: str) -> str:
            out = subprocess.run([sys.executable, "-c", AGENT, spec], env=env,
                                 capture_output=True, text=True, timeout=120)  # fmt: skip
            assert out.returncode == 0, out.stderr[-2000:]
            return out.stdout.strip().splitlines()[-1]

        assert run("hf://acme/agents/safety") == "LOADED hub-safety 64"
        assert run("hf://acme/agents/authors_actor.pth").startswith("LOADED")
        missing = run("hf://acme/agents/nothing-here")
        assert missing.startswith("ERROR") and "agent.safetensors" in missing
        assert run("hf://acme").startswith("ERROR")  # not ORG/REPO
    finally:
        hub.close()
