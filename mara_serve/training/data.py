"""Prompt files → labelled prompts, the harm-keyword filter, and the training-prompt sampler.

File formats: a JSON array of objects or JSON Lines, each record with an `instruction` (or
`prompt`) string — the shapes of the MARA prompt sets (data/prompts/ in the repository).

Labels ("harmful" / "benign" / None) are decided per record, most specific first:
1. the record's own `label` field ("harmful" or "benign");
2. HH-RLHF's `source` field: `harmless-base` (red-teaming) → harmful, `helpful-base` → benign;
3. the file's label, given as a `harmful:PATH` / `benign:PATH` prefix (or by the caller);
4. otherwise None (fine for rewards that ignore labels; the refusal reward refuses to start).

Harmful-labelled sets are noisy: PKU-SafeRLHF mixes clearly harmful requests with benign ones
("How can I stop a neighborhood dog from barking?"), and HH harmless-base holds harmless chat
too. With `harm_filter="keywords"` a harmful-labelled prompt is kept only if it matches
`HARM_PATTERN` (violence, weapons, drugs, theft, fraud, hacking, privacy invasion, abuse, hate,
self-harm, evasion of law…); the rest are dropped from training — neither rewarded for
refusing nor for answering, because rewarding refusals of benign requests teaches over-refusal.
Benign-labelled prompts are never filtered.

Invariant: `PromptSampler` is deterministic given its seed and its saved state (resume).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from mara_serve.engine.errors import MaraError

LABELS = ("harmful", "benign")
HH_SOURCES = {"harmless-base": "harmful", "helpful-base": "benign"}
MIN_PROMPT_CHARS = 5  # a few records are nearly empty ("hi", "?")

# Word stems of clearly harmful intent, matched at a word start (`\\b`); short or ambiguous ones
# are spelled out to the word end. Deliberately no identity words (religions, ethnicities,
# sexual orientation): questions *about* groups are usually benign.
_HARM_STEMS = r"""
kill|murder|assassinat|stab(s|bed|bing)?\b|shoot|gun(s|fire|man|point)?\b|firearm|weapon|
bomb|explosi|grenade|poison|lethal|strangl|suffocat|torture|maim|hurt|injur(e|ing)\b|
harm(s|ed|ing|ful)?\b|attack|assault|violen|beat (up|him|her|them|my|someone)|punch|abus|
molest|rape|raping|kidnap|abduct|hostage|traffick|smuggl|drug|cocaine|heroin|meth\b|
methamphetamine|fentanyl|opioid|ecstasy|lsd\b|overdose|steal|stole|theft|thief|thieves|
rob(s|bed|bing|bery|ber|bers)?\b|burglar|shoplift|loot(ing)?\b|pickpocket|break into|
broke into|lock ?pick|pick a lock|trespass|sneak|hack|malware|ransomware|phish|ddos|
password|spy\b|spying|spyware|surveil|stalk|track (some|my|her|his|their)|
personal (information|details|data)|private information|home address|social security|
credit card|identity theft|dox|scam|fraud|counterfeit|forge(d|ry)?\b|forging|launder|
embezzl|brib|extort|blackmail|ransom|cheat|plagiari|pira(te|cy|ting)|torrent|copyrighted|
illegal|unlawful|illicit|black market|without (getting caught|being caught|being detected|
permission|their (knowledge|consent|permission)|paying)|get away with|evade|evading|
evasion|avoid (getting caught|detection|paying tax|taxes|the police)|cover up|
destroy evidence|alibi|frame (some|him|her)|insult|slur|racis|sexis|hate(s|d|ful)?\b|
hatred|offensive|cuss|curse word|swear word|profan|obscen|porn|nude|naked|prostitut|
suicid|self-harm|kill myself|cut myself|arson|set fire|burn (down|some|his|her)|vandal|
sabotag|terror|extremis|radicali|nazi|genocide|manipulat|gaslight|brainwash|coerc|
intimidat|threat|harass|bully|humiliat|revenge|prank|discriminat|misinformation|
disinformation|propaganda|fake news|fake (id|identity|document|review|account)|deceiv|
decepti|lie to|exploit|cruel|dogfight|cockfight|poach|riot|overthrow|sedition|treason|
molotov|(dump|hide|dispose of) (a|the) body|secretly|false information|trick (people|someone|
him|her|them)|without (them|him|her) (knowing|realizing|noticing)|residential address
""".replace("\n", "")
HARM_PATTERN = re.compile(rf"\b({_HARM_STEMS.strip('|')})", re.IGNORECASE)


class PromptFileError(MaraError):
    """A prompt file is missing, malformed, or yields no usable prompts."""


@dataclass(frozen=True)
class Prompt:
    text: str
    label: str | None = None  # "harmful" | "benign" | None
    source: str = ""  # file name (and HH subset), for the logs
    category: str = ""  # the record's harm category / topic where the file has one


def is_clearly_harmful(text: str) -> bool:
    """True if the prompt names a clearly harmful intent (the keyword heuristic above)."""
    return HARM_PATTERN.search(text) is not None


def split_label(spec: str) -> tuple[str | None, str]:
    """'harmful:PATH' → ('harmful', 'PATH'); a path without a known prefix → (None, path)."""
    head, sep, tail = spec.partition(":")
    if sep and head in LABELS:
        return head, tail
    if sep and head == "auto":
        return None, tail
    return None, spec


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
        records = data if isinstance(data, list) else [data]
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{path}: neither a JSON array nor JSON Lines ({e})") from None
    if not all(isinstance(r, dict) for r in records):
        raise PromptFileError(f"{path}: every record must be an object with an 'instruction'")
    return records


def _record_label(record: dict, file_label: str | None, path: Path) -> str | None:
    label = record.get("label")
    if label is not None:
        if label not in LABELS:
            raise PromptFileError(f"{path}: label must be one of {LABELS}, got {label!r}")
        return label
    return HH_SOURCES.get(record.get("source", ""), file_label)


def load_prompts(spec: str | Path, label: str | None = None) -> list[Prompt]:
    """Read one prompt file; `spec` may carry a 'harmful:' / 'benign:' prefix (see module doc).

    Records without an instruction string, or shorter than MIN_PROMPT_CHARS, are skipped.
    """
    prefix, path_text = split_label(str(spec))
    path = Path(path_text).expanduser()
    file_label = prefix or label
    out = []
    for record in _records(path):
        text = record.get("instruction", record.get("prompt"))
        if not isinstance(text, str) or len(text.strip()) < MIN_PROMPT_CHARS:
            continue
        source = path.name if "source" not in record else f"{path.name}/{record['source']}"
        category = record.get("category", record.get("topic", ""))
        out.append(Prompt(text.strip(), _record_label(record, file_label, path), source,
                          category if isinstance(category, str) else str(category)))  # fmt: skip
    if not out:
        raise PromptFileError(f"{path}: no usable prompts (records need an 'instruction' string)")
    return out


def filter_harmful(prompts: list[Prompt], harm_filter: str) -> tuple[list[Prompt], int]:
    """Apply the harm filter ("keywords" or "none"); returns (kept prompts, number dropped)."""
    if harm_filter == "none":
        return prompts, 0
    if harm_filter != "keywords":
        raise PromptFileError(f"unknown harm filter {harm_filter!r} (use 'keywords' or 'none')")
    kept = [p for p in prompts if p.label != "harmful" or is_clearly_harmful(p.text)]
    return kept, len(prompts) - len(kept)


def training_prompts(
    specs: tuple[str, ...], harm_filter: str, benign_fraction: float, needs_labels: bool
) -> tuple[list[Prompt], dict]:
    """Load, label and filter the training prompt files; returns (prompts, card summary)."""
    prompts = [p for spec in specs for p in load_prompts(spec)]
    prompts, dropped = filter_harmful(prompts, harm_filter)
    unlabelled = sorted({p.source for p in prompts if p.label is None})
    if needs_labels and unlabelled:
        raise PromptFileError(
            f"this reward needs harmful/benign labels, but prompts from {unlabelled} have "
            "none: prefix the file with harmful: or benign:, or add a 'label' field to its "
            "records"
        )
    counts: dict[str, int] = {}
    for p in prompts:
        key = f"{p.source} [{p.label or 'unlabelled'}]"
        counts[key] = counts.get(key, 0) + 1
    summary = {"files": list(specs), "harm_filter": harm_filter,
               "dropped_by_harm_filter": dropped, "prompts": counts,
               "benign_fraction": benign_fraction}  # fmt: skip
    return prompts, summary


class PromptSampler:
    """Draws training prompts: a fixed share of benign ones per batch, each pool walked in a
    seeded random order (a new permutation per pass). Unlabelled prompts form their own pool
    and are used only when there are no labelled ones."""

    def __init__(self, prompts: list[Prompt], benign_fraction: float = 0.5, seed: int = 0):
        pools = {
            "harmful": [p for p in prompts if p.label == "harmful"],
            "benign": [p for p in prompts if p.label == "benign"],
        }
        if not (pools["harmful"] or pools["benign"]):
            pools = {"any": list(prompts)}
        self.pools = {k: v for k, v in pools.items() if v}
        if not self.pools:
            raise PromptFileError("no training prompts")
        self.benign_fraction = benign_fraction
        self.generator = torch.Generator().manual_seed(seed)
        self.orders: dict[str, list[int]] = {k: [] for k in self.pools}
        self.positions: dict[str, int] = {k: 0 for k in self.pools}
        self.drawn = 0  # prompts drawn so far (the benign share is kept exact over time)

    def _next(self, pool: str) -> Prompt:
        if self.positions[pool] >= len(self.orders[pool]):
            self.orders[pool] = torch.randperm(
                len(self.pools[pool]), generator=self.generator
            ).tolist()
            self.positions[pool] = 0
        i = self.orders[pool][self.positions[pool]]
        self.positions[pool] += 1
        return self.pools[pool][i]

    def sample(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            if len(self.pools) == 1:
                pool = next(iter(self.pools))
            else:  # benign when the running benign share falls below the target
                benign_so_far = round(self.drawn * self.benign_fraction)
                want_benign = round((self.drawn + 1) * self.benign_fraction) > benign_so_far
                pool = "benign" if want_benign else "harmful"
            out.append(self._next(pool))
            self.drawn += 1
        return out

    def state_dict(self) -> dict:
        """A snapshot (copies, so later sampling does not change it)."""
        return {
            "generator": self.generator.get_state(),
            "orders": {k: list(v) for k, v in self.orders.items()},
            "positions": dict(self.positions),
            "drawn": self.drawn,
        }

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())  # a checkpoint loaded onto a GPU
        self.orders = {k: list(v) for k, v in state["orders"].items()}
        self.positions = dict(state["positions"])
        self.drawn = int(state["drawn"])
