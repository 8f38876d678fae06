"""Rewards: one interface, `(prompt, response) -> float`, and three plug-ins chosen by a spec.

The terminal reward of an episode (docs/algorithm.md §6) scores the prompt and the finished
response. Specs (`mara train --reward SPEC`):

- `refusal` or `refusal:refuse=1,comply=-1,answer=1,over_refuse=-1,degenerate=-1` — the built-in
  safety reward, no judge model: on a harmful prompt a refusal earns `refuse` and anything else
  `comply`; on a benign prompt a real answer earns `answer` and a refusal `over_refuse`;
  degenerate output (empty, letterless, looping) earns `degenerate` whatever the label. Needs
  labelled prompts (see `data.py`). Refusals are detected by `refusal.is_refusal`.
- `hf:reward=DIR[,cost=DIR][,w_r=1][,w_c=1][,device=cpu][,max_length=1024]` (or `hf:DIR`) —
  local Hugging Face sequence-classification models, combined as `w_r·reward − w_c·cost` like
  the paper's Beaver-7B reward/cost pair (their run used w_r = 2, w_c = 1). A model with one
  output scores with it; with two outputs, the log-odds of label 1.
- `module:function` or `path/to/file.py:function` — any Python callable
  `f(prompt: str, response: str) -> float`; if it takes a `label` keyword it also gets the
  prompt's label. Built-in names (`refusal`, `hf`) win over a module of the same name.

`parse_reward` validates the spec and loads what it names, raising `RewardSpecError` with a clear
message, so a bad spec fails before any episode runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mara_serve.engine.errors import MaraError
from mara_serve.training.data import Prompt
from mara_serve.training.refusal import is_degenerate, is_refusal, pivots_to_compliance


class RewardSpecError(MaraError):
    """A reward spec is malformed or names something that cannot be loaded."""


class Reward:
    """Scores a finished response. Subclasses implement `__call__`; `score_batch` may batch."""

    needs_labels = False

    def __call__(self, prompt: Prompt, response: str) -> float:
        raise NotImplementedError

    def score_batch(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        return [float(self(p, r)) for p, r in zip(prompts, responses, strict=True)]

    def describe(self) -> dict[str, Any]:
        """What the agent card records about this reward."""
        return {"type": type(self).__name__}


class RefusalReward(Reward):
    needs_labels = True
    DEFAULTS = {
        "refuse": 1.0,
        "comply": -1.0,
        # a refusal opening that then pivots to help (refusal.pivots_to_compliance): worse
        # than plain compliance, so the agent does not learn to say "sorry" and comply anyway
        "refuse_then_comply": -1.5,
        "answer": 1.0,
        "over_refuse": -1.0,
        "degenerate": -1.0,
    }

    def __init__(self, **values: float):
        unknown = set(values) - set(self.DEFAULTS)
        if unknown:
            raise RewardSpecError(
                f"refusal reward: unknown keys {sorted(unknown)} "
                f"(known: {', '.join(self.DEFAULTS)})"
            )
        self.values = {**self.DEFAULTS, **values}

    def __call__(self, prompt: Prompt, response: str) -> float:
        v = self.values
        if is_degenerate(response):
            return v["degenerate"]
        refused = is_refusal(response)
        if prompt.label == "harmful":
            if refused and pivots_to_compliance(response):
                return v["refuse_then_comply"]
            return v["refuse"] if refused else v["comply"]
        if prompt.label == "benign":
            return v["over_refuse"] if refused else v["answer"]
        raise RewardSpecError(
            f"the refusal reward needs labelled prompts; unlabelled prompt "
            f"from {prompt.source or 'an unknown file'}"
        )

    def describe(self) -> dict[str, Any]:
        return {"type": "refusal", **self.values}


class ClassifierReward(Reward):
    """`w_r·reward − w_c·cost` from local sequence-classification models."""

    def __init__(
        self,
        reward: str,
        cost: str | None = None,
        w_r: float = 1.0,
        w_c: float = 1.0,
        device: str = "cpu",
        max_length: int = 1024,
        batch_size: int = 8,
    ):
        self.paths = {"reward": reward, "cost": cost}
        self.weights = {"reward": w_r, "cost": w_c}
        self.device, self.max_length, self.batch_size = device, max_length, batch_size
        self.models = {k: _load_classifier(p, device) for k, p in self.paths.items() if p}

    def __call__(self, prompt: Prompt, response: str) -> float:
        return self.score_batch([prompt], [response])[0]

    @torch.inference_mode()
    def score_batch(self, prompts: list[Prompt], responses: list[str]) -> list[float]:
        total = torch.zeros(len(prompts))
        for key, (model, tok) in self.models.items():
            sign = 1.0 if key == "reward" else -1.0
            for i in range(0, len(prompts), self.batch_size):
                part = slice(i, i + self.batch_size)
                scores = _classify(model, tok, prompts[part], responses[part], self.max_length)
                total[part] += sign * self.weights[key] * scores
        return total.tolist()

    def describe(self) -> dict[str, Any]:
        return {
            "type": "hf",
            **{k: v for k, v in self.paths.items() if v},
            "w_r": self.weights["reward"],
            "w_c": self.weights["cost"],
        }


def _load_classifier(path: str, device: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise RewardSpecError(f"hf reward: {p} is not a local Hugging Face model directory")
    try:
        tok = AutoTokenizer.from_pretrained(p)
        model = AutoModelForSequenceClassification.from_pretrained(p, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise RewardSpecError(
            f"hf reward: could not load {p} as a sequence classifier: {e}"
        ) from None
    if model.config.num_labels not in (1, 2):
        raise RewardSpecError(
            f"hf reward: {p} has {model.config.num_labels} labels; a reward or cost model "
            "has 1 (a score) or 2 (log-odds of label 1)"
        )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if model.config.pad_token_id is None:  # decoder classifiers find the last token by padding
        model.config.pad_token_id = tok.pad_token_id
    tok.truncation_side = "left"  # keep the response's end, which a reward model reads
    return model.to(device).eval().requires_grad_(False), tok


def _classify(model, tok, prompts: list[Prompt], responses: list[str], max_length: int):
    if getattr(tok, "chat_template", None):
        texts = [
            tok.apply_chat_template(
                [{"role": "user", "content": p.text}, {"role": "assistant", "content": r}],
                tokenize=False,
            )
            for p, r in zip(prompts, responses, strict=True)
        ]
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    else:  # a plain cross-encoder: (prompt, response) as a text pair
        enc = tok(
            [p.text for p in prompts],
            responses,
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
    logits = model(**enc.to(model.device)).logits.float().cpu()  # (B, 1 or 2)
    return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]


class EntryPointReward(Reward):
    """A user function `f(prompt, response[, label=])`."""

    def __init__(self, fn: Callable[..., float], spec: str):
        self.fn, self.spec = fn, spec
        params = inspect.signature(fn).parameters
        self.pass_label = "label" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    def __call__(self, prompt: Prompt, response: str) -> float:
        kwargs = {"label": prompt.label} if self.pass_label else {}
        value = float(self.fn(prompt.text, response, **kwargs))
        if not math.isfinite(value):
            raise ValueError(f"reward {self.spec} returned {value} for prompt {prompt.text[:60]!r}")
        return value

    def describe(self) -> dict[str, Any]:
        return {"type": "python", "entry_point": self.spec}


def _kv(body: str, spec: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (s.strip() for s in body.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise RewardSpecError(f"reward spec {spec!r}: expected key=value, got {part!r}")
        out[key.strip()] = value.strip()
    return out


def _floats(kv: dict[str, str], spec: str) -> dict[str, float]:
    try:
        return {k: float(v) for k, v in kv.items()}
    except ValueError:
        raise RewardSpecError(f"reward spec {spec!r}: values must be numbers") from None


def _entry_point(spec: str) -> Reward:
    module_name, _, fn_name = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser()
            if not path.is_file():
                raise RewardSpecError(f"reward spec {spec!r}: file {path} not found")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ImportError as e:
        raise RewardSpecError(f"reward spec {spec!r}: cannot import {module_name!r}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardSpecError(f"reward spec {spec!r}: {module_name} has no function {fn_name!r}")
    try:
        inspect.signature(fn).bind("prompt", "response")
    except TypeError:
        raise RewardSpecError(
            f"reward spec {spec!r}: {fn_name} must accept (prompt: str, response: str)"
        ) from None
    return EntryPointReward(fn, spec)


def parse_reward(spec: str) -> Reward:
    """Build the reward a spec names (see the module doc); raises RewardSpecError."""
    spec = spec.strip()
    name, _, body = spec.partition(":")
    if name == "refusal":
        return RefusalReward(**_floats(_kv(body, spec), spec))
    if name == "hf":
        kv = _kv(body, spec) if "=" in body else {"reward": body}
        unknown = set(kv) - {"reward", "cost", "w_r", "w_c", "device", "max_length"}
        if unknown or not kv.get("reward"):
            raise RewardSpecError(
                f"reward spec {spec!r}: use hf:reward=DIR[,cost=DIR][,w_r=1]"
                "[,w_c=1][,device=cpu][,max_length=1024]"
            )
        weights = _floats({k: kv[k] for k in ("w_r", "w_c") if k in kv}, spec)
        return ClassifierReward(
            kv["reward"],
            kv.get("cost"),
            **weights,
            device=kv.get("device", "cpu"),
            max_length=int(kv.get("max_length", 1024)),
        )
    if ":" in spec and spec.rpartition(":")[2].isidentifier():
        return _entry_point(spec)
    raise RewardSpecError(
        f"unknown reward spec {spec!r}: use 'refusal[:k=v,...]', "
        "'hf:reward=DIR[,cost=DIR,...]' or 'module:function'"
    )


def centre_by_prompt(episodes: list, rewards: list[float]) -> list[float]:
    """Per-prompt baseline: each episode's reward minus the mean reward of the agent's own
    (unguided) episodes of the same prompt in this batch, leaving the episode itself out.

    A prompt all of whose samples fail, or all pass, then teaches nothing; only what made an
    episode better or worse than the agent's usual answer is rewarded. Guided episodes
    (guided exploration) are compared with the agent's own answers but never serve as the
    baseline: a guided refusal of a benign prompt must not make the plain answers look better
    than usual. Without such siblings an episode keeps its reward."""
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(episodes):
        groups.setdefault(e.prompt.text, []).append(i)
    out = list(rewards)
    for members in groups.values():
        own = [i for i in members if not getattr(episodes[i], "guided_tokens", 0)]
        for i in members:
            peers = [j for j in own if j != i]
            if peers:
                out[i] = rewards[i] - sum(rewards[j] for j in peers) / len(peers)
    return out
