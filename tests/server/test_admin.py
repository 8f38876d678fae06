"""The agent registry API: load/replace/unload, confinement to the agent directory, safe loading,
and hot swaps that never touch a running stream."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import httpx
import pytest
import torch

BASE = "tiny-llama"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


def admin(server, method: str, name: str = "", body=None, headers=None) -> httpx.Response:
    url = server.base_url + "/admin/agents" + (f"/{name}" if name else "")
    return httpx.request(
        method,
        url,
        json=body,
        timeout=60,
        headers=server.admin_auth if headers is None else headers,
    )


def check_error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if code is not None:
        assert err["code"] == code, err
    return err["message"]


def test_list_put_replace_delete(server) -> None:
    listed = admin(server, "GET").json()
    assert listed["object"] == "list" and "half" in [a["name"] for a in listed["data"]]
    loads_before = server.metric("mara_agent_loads_total", {"agent": "crud"})

    r = admin(server, "PUT", "crud", {"path": "half"})
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["name"], info["version"], info["hidden_size"]) == ("crud", 1, 64)
    assert info["description"] == "half agent" and info["source"].endswith("half")
    ids = [
        m["id"]
        for m in httpx.get(server.base_url + "/v1/models", headers=server.auth).json()["data"]
    ]
    assert "crud" in ids

    r = admin(server, "PUT", "crud", {"path": "reject"})
    assert r.status_code == 200 and r.json()["version"] == 2 and r.json()["replaced"] is True
    assert server.metric("mara_agent_loads_total", {"agent": "crud"}) == loads_before + 2

    body = {"model": "crud", "messages": MESSAGES, "max_tokens": 3, "mara_trace": True}
    trace = server.post("/v1/chat/completions", body).json()["choices"][0]["mara_trace"]
    assert all(t["fallback"] for t in trace if t["evaluated"]), "the reject agent is in place"

    r = admin(server, "DELETE", "crud")
    assert r.status_code == 200 and r.json() == {"name": "crud", "version": 2, "unloaded": True}
    assert server.metric("mara_agent_unloads_total", {"agent": "crud"}) >= 1
    check_error(server.post("/v1/chat/completions", body), 404, "model_not_found")
    check_error(admin(server, "DELETE", "crud"), 404, "agent_not_found")


def test_agents_load_on_the_engine_thread(server, monkeypatch) -> None:
    """A hot load runs its torch work on the engine thread (the process's only torch thread;
    a second OpenMP team halves CPU matmul speed, engine/async_engine.py)."""
    registry = server.state.services.registry
    real_load, loaded_on = registry.load, []

    def load(name, path):
        loaded_on.append(threading.get_ident())
        return real_load(name, path)

    monkeypatch.setattr(registry, "load", load)
    assert admin(server, "PUT", "threaded", {"path": "half"}).status_code == 201
    assert loaded_on == [server.state.engine._thread.ident]
    assert admin(server, "DELETE", "threaded").status_code == 200


def test_hot_swap_during_a_stream_leaves_the_stream_unchanged(server) -> None:
    assert admin(server, "PUT", "swap", {"path": "half"}).status_code in (200, 201)
    body = {"model": "swap", "messages": MESSAGES, "max_tokens": 48, "ignore_eos": True}
    before = server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]

    text, chunks_after_swap, swapped = "", 0, False
    with httpx.stream(
        "POST",
        server.base_url + "/v1/chat/completions",
        headers=server.auth,
        json={**body, "stream": True},
        timeout=60,
    ) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            text += delta
            if delta and not swapped:
                r2 = admin(server, "PUT", "swap", {"path": "half2"})
                assert r2.status_code == 200 and r2.json()["replaced"]
                swapped = True
            elif swapped and delta:
                chunks_after_swap += 1
    assert chunks_after_swap > 5, "the swap happened while the stream was running"
    assert text == before
    after = server.post("/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert after != before, "new requests use the new agent"
    admin(server, "DELETE", "swap")


@pytest.mark.parametrize(
    "path,status,code",
    [
        ("../half", 400, "invalid_agent_path"),
        ("half/../../etc", 400, "invalid_agent_path"),
        ("/etc/passwd", 400, "invalid_agent_path"),
        ("no-such-agent", 404, "agent_path_not_found"),
        ("wrong-size", 400, "invalid_agent"),
        ("half\\..\\x", 400, "invalid_agent_path"),
    ],
)
def test_bad_agent_paths_are_refused(server, path: str, status: int, code: str) -> None:
    message = check_error(admin(server, "PUT", "bad", {"path": path}), status, code)
    if path == "wrong-size":
        assert "hidden size 32" in message and "64" in message
    assert "bad" not in [a["name"] for a in admin(server, "GET").json()["data"]]


def test_symlinks_out_of_the_agent_dir_are_refused(
    server, scratch_agent_dir: Path, agent_dir: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-agent"
    outside.mkdir()
    for f in ("agent.safetensors", "agent.json"):
        (outside / f).write_bytes((agent_dir / "half" / f).read_bytes())
    (scratch_agent_dir / "dir-link").symlink_to(outside, target_is_directory=True)
    inner = scratch_agent_dir / "inner"
    inner.mkdir()
    (inner / "agent.safetensors").symlink_to(outside / "agent.safetensors")
    (scratch_agent_dir / "inside-link").symlink_to(agent_dir / "half", target_is_directory=True)
    rel = scratch_agent_dir.name
    check_error(admin(server, "PUT", "x", {"path": f"{rel}/dir-link"}), 400, "invalid_agent_path")
    check_error(admin(server, "PUT", "x", {"path": f"{rel}/inner"}), 400, "invalid_agent_path")
    # a symlink that stays inside the directory is fine
    assert admin(server, "PUT", "x", {"path": f"{rel}/inside-link"}).status_code == 201
    admin(server, "DELETE", "x")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_and_corrupt_agent_files_are_refused(
    server, scratch_agent_dir: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    torch.save({"ln.weight": _Exploit(marker)}, scratch_agent_dir / "evil_actor.pth")
    (scratch_agent_dir / "junk.safetensors").write_bytes(os.urandom(256))
    torch.save({"not": torch.zeros(3)}, scratch_agent_dir / "other_actor.pth")
    rel = scratch_agent_dir.name
    message = check_error(
        admin(server, "PUT", "evil", {"path": f"{rel}/evil_actor.pth"}), 400, "invalid_agent"
    )
    assert "refused" in message
    assert not marker.exists(), "the pickle payload must never run"
    check_error(
        admin(server, "PUT", "junk", {"path": f"{rel}/junk.safetensors"}), 400, "invalid_agent"
    )
    check_error(
        admin(server, "PUT", "other", {"path": f"{rel}/other_actor.pth"}), 400, "invalid_agent"
    )
    names = [a["name"] for a in admin(server, "GET").json()["data"]]
    assert not {"evil", "junk", "other"} & set(names)


def test_bad_names_and_bodies(server) -> None:
    check_error(admin(server, "PUT", "bad name!", {"path": "half"}), 400)
    check_error(admin(server, "PUT", ".hidden", {"path": "half"}), 400)
    check_error(admin(server, "PUT", BASE, {"path": "half"}), 409)
    check_error(admin(server, "PUT", "ok", {}), 400)
    check_error(admin(server, "PUT", "ok", {"path": 5}), 400)
    check_error(admin(server, "PUT", "ok", {"path": "half", "force": True}), 400)
    check_error(admin(server, "PUT", "ok", {"path": ""}), 400)


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer nope"}, "api-key"],
    ids=["missing", "wrong", "api-key"],
)
def test_admin_needs_the_admin_key(server, headers) -> None:
    if headers == "api-key":
        headers = server.auth
    check_error(admin(server, "GET", headers=headers), 401)
    check_error(admin(server, "PUT", "x", {"path": "half"}, headers=headers), 401)
    check_error(admin(server, "DELETE", "half", headers=headers), 401)


def test_admin_api_is_disabled_without_an_admin_key(start_server, agent_dir: Path) -> None:
    live = start_server(agent_dir=agent_dir)
    r = admin(live, "PUT", "x", {"path": "half"}, headers={"Authorization": "Bearer guess"})
    check_error(r, 403, "admin_api_disabled")
    check_error(admin(live, "GET", headers={}), 403, "admin_api_disabled")


def test_admin_load_needs_an_agent_dir(start_server) -> None:
    live = start_server(admin_key="k")
    r = admin(live, "PUT", "x", {"path": "half"}, headers={"Authorization": "Bearer k"})
    check_error(r, 403, "agent_dir_not_configured")
