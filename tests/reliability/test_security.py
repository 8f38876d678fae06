"""Security properties not covered by tests/server/test_admin.py (agent directory, weights-only
loading): keys compared in constant time, no secret in any log line of a real `mara serve`
run, and CORS off unless origins are configured."""

from __future__ import annotations

import hmac
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from reliability.support import BASE

from mara_serve.server.settings import Settings

REPO = Path(__file__).resolve().parents[2]
API_KEY = "sk-live-api-7f3a9c1e5b"
ADMIN_KEY = "sk-live-admin-2d8e4f6a0c"
WRONG_KEY = "sk-typo-of-another-secret-99"
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def test_keys_are_compared_with_hmac_compare_digest(
    module_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    api, admin = module_server.api_key.encode(), module_server.admin_key.encode()
    url = module_server.base_url
    cases = [
        (url + "/v1/models", module_server.api_key, 200, api),
        (url + "/v1/models", "wrong", 401, api),
        (url + "/admin/agents", module_server.admin_key, 200, admin),
        (url + "/admin/agents", module_server.api_key, 401, admin),
    ]
    for target, token, status, key in cases:
        calls.clear()
        r = httpx.get(target, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == status
        assert calls == [(token.encode(), key)]  # the only comparison, and a constant-time one


def test_settings_never_show_the_keys() -> None:
    s = Settings(api_key=API_KEY, admin_key=ADMIN_KEY)
    for text in (repr(s), str(s), s.model_dump_json()):
        assert API_KEY not in text and ADMIN_KEY not in text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_secret_reaches_the_logs_of_a_real_server(tiny_model_dir: Path, agent_dir: Path) -> None:
    """`mara serve` at debug level with both keys set, served good, bad, unauthorised and admin
    requests, then stopped: neither key, nor a wrong key a client sent, is in its output."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARA_")}
    env.update(MARA_API_KEY=API_KEY, MARA_ADMIN_KEY=ADMIN_KEY)
    cmd = [sys.executable, "-m", "mara_serve", "serve", "--model", str(tiny_model_dir),
           "--port", str(port), "--log-level", "debug", "--agent-dir", str(agent_dir),
           "--max-request-body-bytes", "4096", "--graceful-shutdown-s", "2"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        api = {"Authorization": f"Bearer {API_KEY}"}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        wrong = {"Authorization": f"Bearer {WRONG_KEY}"}
        v1 = url + "/v1/chat/completions"
        assert httpx.post(v1, json=CHAT, headers=api, timeout=30).status_code == 200
        assert httpx.post(v1, json={**CHAT, "stream": True}, headers=api).status_code == 200
        assert httpx.post(v1, json=CHAT, headers=wrong).status_code == 401
        assert httpx.post(v1, json={**CHAT, "model": "nope"}, headers=api).status_code == 404
        assert httpx.post(v1, json={**CHAT, "n": "x"}, headers=api).status_code == 400
        assert httpx.post(v1, content=b"x" * 8192, headers=api).status_code == 413
        put = url + "/admin/agents/probe"
        assert httpx.put(put, json={"path": "half"}, headers=admin).status_code == 201
        assert httpx.put(put, json={"path": "wrong-size"}, headers=admin).status_code == 400
        assert httpx.put(put, json={"path": "half"}, headers=wrong).status_code == 401
        assert httpx.get(url + "/admin/agents", headers=api).status_code == 401
        assert httpx.get(url + "/metrics").status_code == 200
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "agent probe v1 loaded" in output and "draining" in output  # it did log (debug)
    for secret in (API_KEY, ADMIN_KEY, WRONG_KEY):
        assert secret not in output


def test_cors_is_off_by_default(module_server: Any) -> None:
    preflight = httpx.options(
        module_server.base_url + "/v1/chat/completions",
        headers={"Origin": "http://ui.test", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in preflight.headers
    r = httpx.get(
        module_server.base_url + "/v1/models",
        headers={**module_server.auth, "Origin": "http://ui.test"},
    )
    assert r.status_code == 200
    assert not [h for h in r.headers if h.startswith("access-control-")]


def test_cors_allows_exactly_the_configured_origins(serve: Any) -> None:
    live = serve(cors_origins=["http://ui.test"])
    target = live.base_url + "/v1/chat/completions"
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    ok = httpx.options(target, headers={"Origin": "http://ui.test", **ask})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == "http://ui.test"
    assert "POST" in ok.headers["access-control-allow-methods"]
    evil = httpx.options(target, headers={"Origin": "http://evil.test", **ask})
    assert evil.headers.get("access-control-allow-origin") != "http://evil.test"
    r = httpx.post(target, json=CHAT, headers={"Origin": "http://ui.test"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://ui.test"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    r = httpx.post(target, json=CHAT, headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in r.headers
