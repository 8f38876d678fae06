"""Serving the chat page (no browser needed): / and /ui/* are open, only known files are served,
and the page's own calls still need the API key."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from mara_serve.server.app import create_app
from mara_serve.server.settings import Settings


@pytest.fixture(scope="module")
def client() -> TestClient:
    # Not entered as a context manager: the lifespan (model loading) never runs.
    return TestClient(create_app(Settings(api_key="secret")))


def test_page_is_served_without_an_api_key(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script src="/ui/app.js"' in r.text


@pytest.mark.parametrize(
    "name,media_type",
    [("app.js", "text/javascript"), ("style.css", "text/css"), ("favicon.svg", "image/svg+xml")],
)
def test_assets_are_served_with_their_types(client: TestClient, name: str, media_type: str) -> None:
    r = client.get(f"/ui/{name}")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(media_type)
    assert r.headers["etag"]


@pytest.mark.parametrize("path", ["/ui/index.htm", "/ui/..%2Fapp.py", "/ui/../routes/ui.py"])
def test_only_the_pages_own_files_are_served(client: TestClient, path: str) -> None:
    r = client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_the_api_still_needs_the_key(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
