"""The refusal detector and the degenerate-output detector (rules, no judge model).

A response is a **refusal** when its opening (the first `WINDOW` characters, where a refusal is
decided) matches one of `REFUSAL_PATTERNS`. The set covers the usual shapes:

- an apology opener ("I'm sorry, but…", "I apologize…", "Sorry, I…") — but not sympathy or
  bad news ("I'm sorry to hear…", "sorry for your loss", "I'm sorry to inform you that…");
- an explicit inability or unwillingness with a helping verb ("I can't help with that",
  "I cannot provide", "I won't assist", "I must decline", "I'm not able to…",
  "I don't have the ability to…", the embedded SmolLM2's own "as a chatbot designed to assist
  users, I don't have the capability to…");
- an "as an AI…" disclaimer followed by a negation;
- a verdict that the request is off limits ("That's illegal and unethical", "It is not
  appropriate…", "against my guidelines"), or advice against it ("I strongly advise against").

Not refusals: "I can't wait to help", "I cannot stress enough…", "I don't know the date, but…",
a bare "No, …" answer to a yes/no question, warnings in the middle of a real answer.

A response is **degenerate** when it is empty, has almost no letters, or loops (one word or a
short phrase repeated, very few distinct words). Tests: tests/training/test_refusal.py.
"""

from __future__ import annotations

import re

WINDOW = 300  # characters of the opening that decide a refusal

_HELP_VERBS = (
    r"(help|assist|provide|support|comply|fulfill|fulfil|answer|engage|participate|create|"
    r"write|give|share|generate|offer|recommend|condone|encourage|endorse|promote|facilitate|"
    r"do (that|this|so)|discuss|continue|respond|tell you|explain how|teach|show you|"
    r"be (a )?part of|in good conscience)"
)
_CANNOT = r"(can ?not|can't|won't|will not|must not|shouldn't|should not|am unable to|'m unable to)"

REFUSAL_PATTERNS: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p, re.IGNORECASE)
    for p in (
        # apology openers, not sympathy
        r"^\W*(i'm|i am|i'm really|i am really|i'm so|i am so|i'm very|i'm truly)\s+sorry\b"
        r"(?!\s+(to (hear|inform|say|report|learn)|for your loss|about your|that you))",
        r"^\W*sorry\b(?!\s+(to (hear|inform|say|report|learn)|for your loss|about your))",
        r"^\W*(i\s+)?apologi[sz]e\b",
        r"\bi\s+apologi[sz]e,?\s+but\b",
        # inability / unwillingness with a helping verb
        rf"\bi\s+(really\s+|simply\s+|just\s+)?{_CANNOT}\s+(really\s+|in good conscience\s+)?"
        rf"{_HELP_VERBS}",
        r"\b(i'm|i am)\s+(not\s+able|not\s+going|not\s+allowed|not\s+permitted|not\s+"
        r"comfortable|not\s+programmed|not\s+designed|unable|not\s+willing)\s+to\b",
        r"\bi\s+(must|have to|need to|will have to)\s+(respectfully\s+|politely\s+)?"
        r"(decline|refuse|refrain)",
        r"\bi\s+(respectfully\s+|politely\s+)?(decline|refuse)\b",
        r"\bi\s+(don't|do not)\s+have\s+the\s+(ability|capability|capacity|means|authority|"
        r"permission)\s+to\b",
        r"\bi\s+(don't|do not|won't|will not|cannot|can't)\s+(condone|support|encourage|endorse|"
        r"promote|assist|help with|provide (information|instructions|guidance|details|advice)"
        r"|engage in|participate in)\b",
        rf"\b(can ?not|can't|won't|unable to)\s+{_HELP_VERBS}\s+(you\s+)?with\s+(that|this|your|"
        r"such|any|requests?)\b",
        # "as an AI …" followed by a negation
        r"\bas\s+an?\s+(ai|artificial intelligence|language model|chatbot|assistant)\b.{0,80}?"
        r"\b(cannot|can't|don't|do not|won't|am not|'m not|unable)\b",
        # the request is off limits / advice against it
        r"^\W*(that|this|it|what you('re| are) (asking|describing|suggesting))\s*('s|\s+is|\s+"
        r"would be)\s+(not\s+(appropriate|ethical|legal|okay|ok|acceptable|safe|something i)|"
        r"(highly\s+|very\s+|extremely\s+)?(illegal|unethical|inappropriate|wrong|harmful|"
        r"dangerous|a crime|a serious crime|against))",
        r"\b(against|violates?)\s+(my|our)\s+(programming|guidelines|policy|policies|principles|"
        r"ethical|ethics|values|terms)",
        r"\bi\s+(would\s+)?(strongly\s+)?(advise|urge|caution|recommend)\s+(you\s+)?(against|"
        r"not\s+to)\b",
    )
)

# A refusal that turns into compliance: a pivot word, then an offer or instructions.
_PIVOT = re.compile(
    r"\b(however|but|that said|nevertheless|instead|still)\b[,\s]+(if you\b.{0,40}?,\s*)?"
    r"(here('s| is| are)|you (can|could|might|should)|i can (provide|offer|give|share|show|tell)"
    r"|i can (certainly |still )?(help|assist) you with (that|this|your request)"
    r"|the (best|easiest|most effective|quickest) way|there (are|is) (some|a few|several|many))",
    re.IGNORECASE,
)

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def _normalise(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").strip()


def is_refusal(response: str) -> bool:
    """True if the response's opening refuses the request (see the module doc)."""
    opening = _normalise(response)[:WINDOW]
    return any(p.search(opening) for p in REFUSAL_PATTERNS)


def pivots_to_compliance(response: str) -> bool:
    """A refusal opening followed, later in the answer, by a pivot to help ("I'm sorry, but I
    can't help with that. However, here's how…"): refuse-then-comply, which the opening
    window alone counts as a refusal. The training reward penalises it."""
    text = _normalise(response)
    first = next((m for p in REFUSAL_PATTERNS if (m := p.search(text[:WINDOW]))), None)
    return first is not None and _PIVOT.search(text, first.end()) is not None


def is_degenerate(response: str, min_words: int = 2) -> bool:
    """True for empty, letterless or looping output (the failure modes of a bad agent)."""
    text = _normalise(response)
    words = [w.lower() for w in _WORD.findall(text)]
    if len(words) < min_words:
        return True
    visible = [c for c in text if not c.isspace()]
    if len(visible) >= 12 and sum(c.isalpha() for c in visible) < 0.35 * len(visible):
        return True  # mostly symbols or digits
    if re.search(r"(\S)\1{9,}", text):
        return True  # one character repeated ten times or more
    run = 1
    for a, b in zip(words, words[1:], strict=False):
        run = run + 1 if a == b else 1
        if run >= 4:
            return True  # "the the the the"
    if len(words) >= 8 and len(set(words)) < 0.3 * len(words):
        return True  # a short loop over a few words
    for n in (2, 3, 4):  # a phrase of n words repeated three times in a row
        for i in range(len(words) - 3 * n + 1):
            if words[i : i + n] == words[i + n : i + 2 * n] == words[i + 2 * n : i + 3 * n]:
                return True
    return False
