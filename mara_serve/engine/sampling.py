"""Per-request sampling parameters and plain (agent-less) token sampling.

`SamplingParams` is the engine's whole view of a request's decoding knobs. MARA rows use only
`top_k`/`top_p` (candidate selection, docs/algorithm.md §1; temperature changes nothing there);
plain rows sample with temperature/top-k/top-p and a per-request seeded generator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mara_serve.engine.errors import InvalidRequestError

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs bound)

MARA_DEFAULT_TOP_K = 40
MARA_DEFAULT_TOP_P = 0.95


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None means "the mode's default": MARA 40 / 0.95, plain decoding no top-k and top-p 1.0.
    top_k: int | None = None
    top_p: float | None = None
    temperature: float = 1.0
    # vLLM's min_p: drop tokens less likely than min_p x the most likely one (plain rows: after
    # temperature, top-k and top-p; MARA rows: from the candidate list). 0: off.
    min_p: float = 0.0
    seed: int | None = None
    # Log-probabilities of each emitted token and of the `logprobs` most likely tokens at its
    # step (0: the emitted token's only); None: off. See `token_logprobs`.
    logprobs: int | None = None
    # Logit controls, applied before candidate selection (logits_processing.py): OpenAI's
    # penalties over the generated tokens, vLLM's repetition penalty over prompt + generated
    # tokens, per-token biases, and no end token before `min_tokens` tokens.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    allowed_token_ids: tuple[int, ...] | None = None  # only these may be generated
    # vLLM's bad_words as token sequences: a sequence's last token is banned whenever the
    # output ends with the rest of it (a one-token sequence: always)
    bad_words_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def controls_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias
                    or self.min_tokens or self.repetition_penalty != 1.0
                    or self.allowed_token_ids is not None
                    or bool(self.bad_words_ids))  # fmt: skip

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:  # 0: the prompt only (scoring; the engine emits nothing)
            raise InvalidRequestError("max_new_tokens must be >= 0", "max_tokens")
        if self.top_k is not None and self.top_k < 1:
            raise InvalidRequestError("top_k must be >= 1", "top_k")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError("top_p must be in (0, 1]", "top_p")
        if self.temperature < 0.0:
            raise InvalidRequestError("temperature must be >= 0", "temperature")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError("min_p must be in [0, 1]", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2]", name)
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise InvalidRequestError("repetition_penalty must be in (0, 10]", "repetition_penalty")
        if any(not -100.0 <= b <= 100.0 for _, b in self.logit_bias):
            raise InvalidRequestError("logit_bias values must be in [-100, 100]", "logit_bias")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidRequestError("allowed_token_ids must not be empty", "allowed_token_ids")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequestError("min_tokens must be in [0, max_tokens]", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be in [0, {MAX_LOGPROBS}]", "logprobs")

    @property
    def greedy(self) -> bool:
        """A plain row takes the argmax (temperature below GREEDY_BELOW, 0 included)."""
        return self.temperature < GREEDY_BELOW

    def mara_top_k(self) -> int:
        return MARA_DEFAULT_TOP_K if self.top_k is None else self.top_k

    def mara_top_p(self) -> float:
        return MARA_DEFAULT_TOP_P if self.top_p is None else self.top_p


# Below this temperature sampling is greedy: the distribution is one-hot in float32 anyway, and
# logits / 1e-300 overflow to inf (softmax NaN: every such request would fail).
GREEDY_BELOW = 1e-5


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A private generator per seeded request, so its samples do not depend on its neighbours."""
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> int:
    """Draw the next token of a plain row from its logits (V,). A temperature below
    GREEDY_BELOW (0 included) is greedy."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p is not None and params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= 1.0 - params.top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(-1)
    if params.min_p > 0.0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0.0)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprobs(
    logits: torch.Tensor, token_id: int, n: int
) -> tuple[float, tuple[tuple[int, float], ...]]:
    """The model's log-probability of `token_id` and its `n` most likely tokens, from the
    logits (V,) the token was chosen from: `log_softmax` in float32 over the whole vocabulary,
    before temperature, top-k/top-p or MARA's candidate renormalisation — the base model's own
    view, so a client sees how far sampling or the agent moved from the model's choice."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top: tuple[tuple[int, float], ...] = ()
    if n:
        vals, ids = torch.topk(logp, min(n, logp.numel()))
        top = tuple(zip(ids.tolist(), vals.tolist(), strict=True))
    return float(logp[token_id]), top
