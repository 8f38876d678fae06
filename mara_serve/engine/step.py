"""The MARA decode step: one token for every running row (docs/algorithm.md §7).

1. candidates per row from its next-position logits (MARA rows: docs/algorithm.md §1; plain rows:
   the one sampled token);
2. ONE forward of all rows' candidates (`ModelRunner.forward_tokens`, tree attention);
3. one agent call per distinct agent on all its rows' candidate states;
4. per row the first accepted candidate (all rejected → rank 0, the top-1; an agent with
   `fallback_last = True` — training episodes — gets the last candidate instead);
5. commit only the chosen tokens' K/V and run the LM head on the chosen states only.

Chunked mode (`chunk_size=m`) evaluates the first m candidates, then the next m only for rows
whose candidates were all rejected, and so on — for hardware where extra tokens are not free.
Either way the emitted tokens are those of the serial reference (`reference.py`).

Undecided rows (`defer=True`, the serving default): a step runs ONE forward. A row whose
candidates this round were all rejected emits nothing this step; its state (`StepRow`, kept as
`Sequence.undecided`) carries its next candidates into the next step's forward, next to the
other rows' new tokens. Without it a step runs rounds until every row has decided, so one
rejecting row made the whole batch wait for extra forwards (on a GPU each costs about a whole
step; on a CPU its weight pass). The tokens are the same either way: a candidate's state does
not depend on when it is scored. While a row is undecided its rank-0 K/V stays at cache position
`length` (its fallback); the rest of its scratch positions are rewritten when judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from mara_serve.engine.candidates import select_candidates_batch
from mara_serve.engine.logits_processing import processed_logits
from mara_serve.engine.request import TokenTrace
from mara_serve.engine.runner import ModelRunner
from mara_serve.engine.sampling import sample_token, token_logprobs
from mara_serve.engine.sequence import Sequence


@dataclass
class StepRow:
    """One row's progress through the candidate rounds of a step."""

    cands: list[int]
    probs: list[float]
    judged: list[int] = field(default_factory=list)
    judged_probs: list[float] = field(default_factory=list)
    offset: int = 0  # next candidate rank to evaluate
    chosen: int | None = None  # chosen rank once decided
    fallback: bool = False
    rank0_hidden: torch.Tensor | None = None  # rank 0's state (all rejected → its fallback)
    # The emitted token's trace, once the engine has sent a token decided before the forward
    # (`decide_early`); the step then reuses it instead of computing its logprobs again.
    trace: TokenTrace | None = None

    @property
    def needs_agent(self) -> bool:
        return len(self.cands) > 1

    def resumed(self) -> StepRow:
        """A copy to advance in this step: the stored row stays as it was until the step has
        succeeded (a failed batch is retried row by row from the same state, engine.py)."""
        return replace(self, judged=list(self.judged), judged_probs=list(self.judged_probs))


def plan_rows(seqs: list[Sequence]) -> list[StepRow]:
    """Each sequence's row for this step: an undecided row resumes, the others start from
    their next-position logits (a plain row samples its token here, once: a step retried row
    by row after a batch failure reuses the plan, so it emits what the batch would have)."""
    rows = [s.undecided.resumed() if s.undecided is not None else None for s in seqs]
    fresh = [i for i, row in enumerate(rows) if row is None]
    if fresh:
        for i, row in zip(fresh, _candidate_rows([seqs[i] for i in fresh]), strict=True):
            rows[i] = row
    return rows  # type: ignore[return-value]


def _candidate_rows(seqs: list[Sequence]) -> list[StepRow]:
    logits = torch.stack([s.next_logits for s in seqs])  # (B, V), a copy
    for i, s in enumerate(seqs):
        # before candidates (logits_processing.py has the order): the agent sees the same
        # distribution the request's sampling controls define, and allowed tokens only
        if s.params.controls_logits or s.constraint is not None:
            logits[i] = processed_logits(logits[i], s.params, s.request.prompt_token_ids,
                                         s.output_ids, s.stop_ids, s.constraint)  # fmt: skip
    rows: list[StepRow | None] = [None] * len(seqs)
    mara = [i for i, s in enumerate(seqs) if s.agent is not None]
    if mara:
        cands = select_candidates_batch(
            logits[mara], [seqs[i].params.mara_top_k() for i in mara],
            [seqs[i].params.mara_top_p() for i in mara], [seqs[i].params.min_p for i in mara],
        )  # fmt: skip
        for i, c in zip(mara, cands, strict=True):
            rows[i] = StepRow(c.token_ids.tolist(), c.probs.tolist())
    # greedy plain rows: one argmax and one device→host copy for all of them
    greedy = [i for i, s in enumerate(seqs) if s.agent is None and s.params.greedy]
    if greedy:
        for i, t in zip(greedy, logits[greedy].argmax(-1).tolist(), strict=True):
            rows[i] = StepRow([t], [1.0])
    for i, s in enumerate(seqs):
        if rows[i] is None:
            rows[i] = StepRow([sample_token(logits[i], s.params, s.generator)], [1.0])
    return rows  # type: ignore[return-value]


PROBE_THRESHOLD = 0.75  # probe rank 0 alone when a row's agent accepted it this often lately


def _round_size(
    row: StepRow, seq: Sequence, chunk_size: int | None, probe: bool, rest_at_once: bool
) -> int:
    """How many of a row's remaining candidates this round evaluates.

    Any split gives the same tokens (each candidate sees prefix + itself only); this is purely
    a cost choice. On CPUs a forward of 4 tokens costs ~1.4x one token (and 16 rows of them
    are compute-bound), so a row whose agent has mostly accepted the top-1 lately (a trained
    agent on benign text) first tries rank 0 alone (a probe of two, where two tokens cost what
    one does, measured slower: bench/RESULTS.md); a row whose agent keeps rejecting
    everything (it will judge the whole list anyway) gets all its candidates in one forward
    instead of chunk after chunk.
    With `rest_at_once` (GPUs: a round costs a launch and a sync more than its tokens) a row
    whose first chunk was all rejected gets all the rest in its second round.
    """
    if probe and row.offset == 0 and row.needs_agent and seq.rank0_rate >= PROBE_THRESHOLD:
        return 1
    if chunk_size is None or seq.fallback_rate >= PROBE_THRESHOLD:
        return len(row.cands)
    if rest_at_once and row.offset > 0:
        return len(row.cands) - row.offset
    return chunk_size


def token_trace(seq: Sequence, row: StepRow) -> TokenTrace:
    """The trace of a decided row's token (logprobs from the logits it was chosen from, so
    call it before the step replaces `seq.next_logits`)."""
    if row.trace is not None:
        return row.trace
    token = row.cands[row.chosen]
    logprob, top = None, ()
    if seq.params.logprobs is not None:
        logprob, top = token_logprobs(seq.next_logits, token, seq.params.logprobs)
    return TokenTrace(
        token_id=token, num_candidates=len(row.cands), accepted_rank=row.chosen,
        accept_prob=None if not row.judged or row.fallback else row.judged_probs[-1],
        fallback=row.fallback, candidates=tuple(row.judged),
        accept_probs=tuple(row.judged_probs), llm_probs=tuple(row.probs[: len(row.judged)]),
        logprob=logprob, top_logprobs=top,
    )  # fmt: skip


def decide_early(seq: Sequence, row: StepRow) -> TokenTrace:
    """Settle a one-candidate row's token now, before the step's forward (a plain row: its
    token was sampled from the last forward's logits, the forward only computes its K/V and
    next logits); returns its trace, kept on the row, which the step then only runs forward."""
    assert not row.needs_agent
    row.chosen = 0
    row.trace = token_trace(seq, row)
    return row.trace


def decode_step(
    runner: ModelRunner,
    seqs: list[Sequence],
    planned: list[StepRow],
    chunk_size: int | None = None,
    probe_top1: bool = True,
    rest_at_once: bool = False,
    defer: bool = False,
) -> list[TokenTrace | None]:
    """Advance the sequences by one token; returns the trace of each one's emitted token, or
    None for a row left undecided (`defer`: one forward per step, module doc).

    planned: `plan_rows(seqs)`, left unchanged (the step advances copies), so a failed batch
    can be retried row by row from the same plan.
    chunk_size: candidates per round (None: all remaining at once). probe_top1: rows whose
    agent recently accepted rank 0 at least PROBE_THRESHOLD of the time try it alone first.
    rest_at_once: a row's second round judges all its remaining candidates (`_round_size`).
    """
    rows = [row.resumed() for row in planned]
    chosen_hidden: list[torch.Tensor | None] = [None] * len(seqs)
    pending = list(range(len(seqs)))
    while pending:
        # Pack this round's tokens row-major: row r gets ranks [offset, offset + m).
        tok, row_of, col_of, rank_of, spans = [], [], [], [], {}
        for r_i, i in enumerate(pending):
            row = rows[i]
            m = _round_size(row, seqs[i], chunk_size, probe_top1, rest_at_once)
            chunk = row.cands[row.offset : row.offset + m]
            spans[i] = (len(tok), len(chunk))
            tok += chunk
            row_of += [r_i] * len(chunk)
            col_of += range(len(chunk))
            rank_of += range(row.offset, row.offset + len(chunk))
        hidden = runner.score(
            [seqs[i].slot for i in pending],
            [seqs[i].length for i in pending],
            tok,
            row_of,
            col_of,
            rank_of,
        )  # (N, H)
        accept = _judge(seqs, rows, pending, spans, hidden)
        still = []
        for i in pending:
            row, (start, n) = rows[i], spans[i]
            if row.offset == 0:
                row.rank0_hidden = hidden[start]
            if not row.needs_agent:
                row.chosen = 0
            else:
                probs = accept[i]
                first = next((j for j, p in enumerate(probs) if p > 0.5), None)
                take = n if first is None else first + 1
                row.judged += row.cands[row.offset : row.offset + take]
                row.judged_probs += probs[:take]
                if first is not None:
                    row.chosen = row.offset + first
                elif row.offset + n < len(row.cands):
                    row.offset += n  # all of this chunk rejected: judge the next one
                    still.append(i)
                    continue
                else:  # all rejected: emit the top-1 (default_action_idx = 0,
                    # docs/algorithm.md §3), or the last candidate for a training agent with
                    # `fallback_last` (the authors' training-time rule; the last rank is in
                    # this final round)
                    last = getattr(seqs[i].agent, "fallback_last", False)
                    row.chosen, row.fallback = (len(row.cands) - 1 if last else 0), True
            chosen_hidden[i] = (
                row.rank0_hidden
                if row.fallback and row.chosen == 0
                else hidden[start + row.chosen - row.offset]
            )
        pending = [] if defer else still
    decided = [i for i, row in enumerate(rows) if row.chosen is not None]
    # Keep only the chosen candidates' K/V; the LM head runs on the chosen states only.
    runner.commit([seqs[i].slot for i in decided], [seqs[i].length for i in decided],
                  [rows[i].chosen for i in decided])  # fmt: skip
    # a row whose token ends it needs no next logits (it leaves the batch after this step)
    going_on = [i for i in decided
                if seqs[i].finish_reason_after(rows[i].cands[rows[i].chosen]) is None]  # fmt: skip
    logits = runner.logits(torch.stack([chosen_hidden[i] for i in going_on])) if going_on else None
    next_logits = {i: logits[j] for j, i in enumerate(going_on)} if logits is not None else {}
    traces: list[TokenTrace | None] = [None] * len(seqs)
    for i, row in enumerate(rows):  # only now the step has succeeded: store the rows' state
        if row.chosen is None and row.rank0_hidden is not None:
            row.rank0_hidden = row.rank0_hidden.clone()  # not a view holding the whole round
        seqs[i].undecided = None if row.chosen is not None else row
    for i in decided:
        s, row = seqs[i], rows[i]
        traces[i] = token_trace(s, row)
        s.next_logits = next_logits.get(i)
        if row.needs_agent:
            s.rank0_rate = 0.8 * s.rank0_rate + 0.2 * (row.chosen == 0 and not row.fallback)
            s.fallback_rate = 0.8 * s.fallback_rate + 0.2 * row.fallback
    return traces


def _judge(seqs, rows, pending, spans, hidden) -> dict[int, list[float]]:
    """One agent call per distinct agent over all its rows' candidate states."""
    by_agent: dict[int, list[int]] = {}
    for i in pending:
        if rows[i].needs_agent:
            by_agent.setdefault(id(seqs[i].agent), []).append(i)
    accept: dict[int, list[float]] = {}
    for members in by_agent.values():
        agent = seqs[members[0]].agent
        index = torch.cat([
            torch.arange(spans[i][0], spans[i][0] + spans[i][1]) for i in members
        ]).to(hidden.device)  # fmt: skip
        states = hidden.index_select(0, index)
        if getattr(agent, "sees_candidates", False):
            # A training agent that steers by token (training/episodes.py) also gets, per member
            # row, its full candidate list and the rank of the row's first state in this call.
            views = [(rows[i].cands, rows[i].offset) for i in members]
            probs = agent.accept_probs(states, candidates=views).tolist()
        else:
            probs = agent.accept_probs(states).tolist()  # (n,) float32
        pos = 0
        for i in members:
            n = spans[i][1]
            accept[i] = probs[pos : pos + n]
            pos += n
    return accept
