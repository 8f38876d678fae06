"""The default torch thread count under a cgroup CPU quota (server/cpu_quota.py): read from
cgroup v2 or v1 files, capped below the cores the process may use, and applied on the thread
that builds the server's engine when --torch-threads is unset."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from mara_serve.server import cpu_quota, lifecycle
from mara_serve.server.settings import Settings


def _v2(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir()
    (tmp_path / "cpu.max").write_text(text)
    return tmp_path


def _v1(tmp_path: Path, quota: int, period: int) -> Path:
    (tmp_path / "cpu").mkdir(parents=True)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    return tmp_path


def test_the_quota_is_read_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    assert cpu_quota.cgroup_cpu_limit(_v2(tmp_path / "a", "150000 100000\n")) == 1.5
    assert cpu_quota.cgroup_cpu_limit(_v2(tmp_path / "b", "max 100000\n")) is None
    assert cpu_quota.cgroup_cpu_limit(_v1(tmp_path / "c", 300000, 100000)) == 3.0
    assert cpu_quota.cgroup_cpu_limit(_v1(tmp_path / "d", -1, 100000)) is None
    assert cpu_quota.cgroup_cpu_limit(tmp_path / "missing") is None


@pytest.fixture()
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.parametrize(("cpu_max", "threads"), [
    ("150000 100000", 1), ("250000 100000", 2), ("50000 100000", 1),
    ("400000 100000", None), ("800000 100000", None), ("max 100000", None),
])  # fmt: skip
def test_a_quota_below_the_cores_caps_the_threads(
    tmp_path: Path, four_cores: None, cpu_max: str, threads: int | None
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max)
    assert cpu_quota.quota_threads(tmp_path) == threads


def test_the_server_engine_takes_the_quota_when_torch_threads_is_unset(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = torch.get_num_threads() + 1  # never torch's own default here
    monkeypatch.setattr(lifecycle, "quota_threads", lambda: want)
    built: dict = {}

    def build(**settings) -> None:  # on a thread of its own, as AsyncEngine.launch does
        built["engine"] = lifecycle.build_llm_engine(
            Settings(model=str(tiny_model_dir), device="cpu", **settings)
        )

    before = torch.get_num_threads()
    try:
        for settings, expected in (({}, want), ({"torch_threads": 1}, 1)):
            thread = threading.Thread(target=build, kwargs=settings)
            thread.start()
            thread.join(120)
            assert built.pop("engine").torch_threads == expected, settings
    finally:
        torch.set_num_threads(before)
