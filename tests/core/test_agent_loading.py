"""Agent files: the authors' .pth, our format, and everything that must be refused."""

import json
import pickle

import pytest
import torch
from tiny_models import make_agent

from mara_serve.engine.agent import AgentCard, AgentNetwork, load_agent, save_agent
from mara_serve.engine.errors import AgentLoadError
from mara_serve.engine.registry import AgentRegistry


def authors_state_dict(hidden: int = 64, inner: int = 1024) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {k: v.clone() for k, v in AgentNetwork(hidden, inner).state_dict().items()}


def test_loads_authors_pth_unchanged_and_reads_sizes_from_weights(tmp_path):
    sd = authors_state_dict(64, 1024)
    path = tmp_path / "mistral_v3_2_1_actor.pth"
    torch.save(sd, path)
    agent = load_agent(path, expected_hidden_size=64)
    assert agent.hidden_size == 64 and agent.card.inner_dim == 1024
    assert agent.name == "mistral_v3_2_1"
    states = torch.randn(5, 64)
    ref = AgentNetwork(64, 1024)
    ref.load_state_dict(sd)
    want = torch.softmax(ref(states), -1)[:, 1]
    torch.testing.assert_close(agent.accept_probs(states), want)


def test_our_format_round_trips_with_card(tmp_path):
    agent = make_agent("reject")
    card = AgentCard(name="safety", hidden_size=64, inner_dim=64, base_model="tiny",
                     description="test agent", extra={"reward": "refusal"})  # fmt: skip
    out = save_agent(agent.network, card, tmp_path / "safety")
    loaded = load_agent(out, expected_hidden_size=64)
    assert loaded.card.base_model == "tiny" and loaded.card.extra["reward"] == "refusal"
    states = torch.randn(4, 64)
    torch.testing.assert_close(loaded.accept_probs(states), agent.accept_probs(states))
    assert json.loads((out / "agent.json").read_text())["hidden_size"] == 64


def test_wrong_hidden_size_is_refused_at_load_time(tmp_path):
    path = tmp_path / "big_actor.pth"
    torch.save(authors_state_dict(4096, 1024), path)
    with pytest.raises(AgentLoadError, match="hidden size 4096 does not match .* 64"):
        load_agent(path, expected_hidden_size=64)
    registry = AgentRegistry(hidden_size=64)
    with pytest.raises(AgentLoadError, match="does not match"):
        registry.load("big", path)
    assert "big" not in registry


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/mara_pwned_by_agent_file",))


def test_malicious_pickle_is_refused_and_never_executed(tmp_path):
    import os

    marker = "/tmp/mara_pwned_by_agent_file"
    if os.path.exists(marker):
        os.remove(marker)
    path = tmp_path / "evil_actor.pth"
    torch.save({"ln.weight": _Exploit()}, path)
    with pytest.raises(AgentLoadError, match="refused"):
        load_agent(path)
    raw = tmp_path / "raw_actor.pth"
    raw.write_bytes(pickle.dumps(_Exploit()))
    with pytest.raises(AgentLoadError):
        load_agent(raw)
    assert not os.path.exists(marker)


def test_truncated_and_garbage_files_give_clear_errors(tmp_path):
    good = tmp_path / "good_actor.pth"
    torch.save(authors_state_dict(), good)
    cut = tmp_path / "cut_actor.pth"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(AgentLoadError, match="corrupt or truncated"):
        load_agent(cut)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(AgentLoadError, match="corrupt or truncated"):
        load_agent(junk)
    with pytest.raises(AgentLoadError, match="not found"):
        load_agent(tmp_path / "missing.pth")
    with pytest.raises(AgentLoadError, match="unknown agent format"):
        (tmp_path / "agent.txt").write_text("hi")
        load_agent(tmp_path / "agent.txt")


def test_wrong_keys_and_shapes_are_refused(tmp_path):
    sd = authors_state_dict()
    sd["extra.weight"] = torch.zeros(1)
    path = tmp_path / "keys_actor.pth"
    torch.save(sd, path)
    with pytest.raises(AgentLoadError, match="unexpected keys"):
        load_agent(path)
    critic = {f"linear{i}{j}.weight": torch.zeros(2, 2) for i in (1, 2) for j in (1, 2, 3)}
    torch.save(critic, path)
    with pytest.raises(AgentLoadError, match="not a MARA agent"):
        load_agent(path)
    sd = authors_state_dict()
    sd["linear2.weight"] = torch.zeros(10, 1024)
    torch.save(sd, path)
    with pytest.raises(AgentLoadError, match="shape"):
        load_agent(path)
    sd = authors_state_dict()
    sd["ln.bias"][0] = float("nan")
    torch.save(sd, path)
    with pytest.raises(AgentLoadError, match="NaN"):
        load_agent(path)


def test_registry_swap_keeps_pinned_agent_and_bumps_version(tmp_path):
    registry = AgentRegistry(hidden_size=64)
    a1 = save_agent(make_agent("accept").network, AgentCard("x", 64, 64), tmp_path / "a1")
    a2 = save_agent(make_agent("reject").network, AgentCard("x", 64, 64), tmp_path / "a2")
    e1 = registry.load("safety", a1)
    pinned = e1.agent
    e2 = registry.load("safety", a2)
    assert (e1.version, e2.version) == (1, 2)
    assert registry.get("safety").agent is e2.agent and pinned is not e2.agent
    states = torch.randn(3, 64)
    assert bool((pinned.accept_probs(states) > 0.5).all())  # the pinned agent is unchanged
    with pytest.raises(AgentLoadError):
        registry.load("safety", tmp_path / "missing")
    assert registry.get("safety").version == 2  # a failed load leaves the old agent in place
    assert registry.unload("safety") is not None and "safety" not in registry
