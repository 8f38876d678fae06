"""Fixtures for the browser tier: headless Chromium (Debian's `chromium`, driven by playwright)
against a live server on 127.0.0.1 with the tiny random model and two agents.

The tiny model, agents and `LiveServer` come from the HTTP tier's fixtures
(tests/live_server.py). The model has a 4096-token context so a stream
can run long enough to be stopped. Every test skips with the reason when playwright or
Chromium is missing (install: `pip install playwright` and `apt-get install -y chromium`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import live_server as http
import pytest
from headless_chromium import CHROMIUM_ARGS, chromium_path

from mara_serve.engine.agent import AgentCard, save_agent
from mara_serve.engine.loading import ModelConfig, load_model
from mara_serve.server.settings import Settings

API_KEY = "ui-test-key"


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need playwright: .venv/bin/pip install playwright")
    executable = chromium_path()
    if executable is None:
        pytest.skip("browser tests need Chromium: apt-get install -y chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def ui_server(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Base model `tiny-llama`; agents `half` (rejects about half of the candidates) and
    `reject` (rejects everything: every token is a fallback)."""
    root = tmp_path_factory.mktemp("ui")
    model_dir = http.build_tiny_model(root / "tiny-llama", context=4096)
    # float32 as in the HTTP tiers (auto would pick bf16 on a CPU with native bf16)
    lm = load_model(ModelConfig(model=str(model_dir), device="cpu", dtype="float32"))
    agents = {}
    for name, seed in (("half", 1), ("reject", 0)):
        card = AgentCard(name=name, hidden_size=http.HIDDEN, inner_dim=64,
                         description=f"test agent ({name})")  # fmt: skip
        save_agent(http.make_agent_network(lm, name, seed), card, root / name)
        agents[name] = root / name
    settings = Settings(api_key=API_KEY, agents=agents, max_concurrent=8)
    live = http._start(lm, settings)
    yield live
    live.stop()


@pytest.fixture()
def open_chat(browser: Any, ui_server: Any) -> Iterator[Callable[..., Any]]:
    """Factory: `open_chat(width=1280, height=800, scheme="light", scale=1)` → a new page on
    the chat, API key entered and models loaded. Fails the test on uncaught page errors."""
    contexts: list[Any] = []
    errors: list[str] = []

    def open_(width: int = 1280, height: int = 800, scheme: str = "light", scale: int = 1) -> Any:
        context = browser.new_context(
            base_url=ui_server.base_url,
            viewport={"width": width, "height": height},
            color_scheme=scheme,
            device_scale_factor=scale,
        )
        contexts.append(context)
        context.set_default_timeout(15_000)
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on(  # the page must work under its own Content-Security-Policy
            "console",
            lambda m: errors.append(m.text) if "Content Security Policy" in m.text else None,
        )
        page.goto("/")
        page.get_by_label("API key", exact=True).fill(API_KEY)
        page.get_by_label("API key", exact=True).press("Tab")  # `change` loads the models
        page.wait_for_function("() => document.querySelectorAll('#model option').length >= 3")
        return page

    yield open_
    for context in contexts:
        context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture()
def page(open_chat: Callable[..., Any]) -> Any:
    """The chat page at laptop width, light scheme."""
    return open_chat()
