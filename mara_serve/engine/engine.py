"""The engine: a bounded waiting queue, a running batch, and the step loop (continuous batching).

`LLMEngine` is synchronous and owned by one thread: `step()` admits waiting requests into free
cache slots (prefill), plans every running row's step (tokens known before the forward — plain
rows' — go out at once through `on_decided`), runs one `decode_step` for the rows, and returns
the new tokens as `RequestOutput` deltas. Requests join and leave the batch between steps.
`add_request` and `abort` may be called from any thread (they only touch the lock-protected
intake).

Invariants: running[i].slot == i for all i (dense slots); a request is in exactly one of
waiting/running until it finishes; every request ends with exactly one finished output.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mara_serve.engine.errors import (
    ContextLengthExceededError,
    EngineDeadError,
    EngineNotReadyError,
    InvalidRequestError,
    QueueFullError,
)
from mara_serve.engine.kv_cache import kv_budget
from mara_serve.engine.loading import LoadedModel
from mara_serve.engine.prefix_cache import PrefixCache
from mara_serve.engine.request import Request, RequestOutput, TokenTrace
from mara_serve.engine.runner import MAX_CANDIDATES, ModelRunner
from mara_serve.engine.sequence import Sequence
from mara_serve.engine.step import StepRow, decide_early, decode_step, plan_rows

log = logging.getLogger(__name__)

CPU_CHUNK_SIZE = 4
GPU_CHUNK_SIZE = 8
Result = tuple[list[int], list[TokenTrace], str]  # token ids, traces, finish reason


@dataclass(frozen=True)
class EngineConfig:
    max_running: int = 16  # cache slots = rows of the running batch (fewer if the KV budget says)
    max_waiting: int = 256  # bounded queue; beyond it add_request raises QueueFullError
    # Candidates judged per forward (a value >= top_k: all at once). None picks by device, as
    # measured by bench/decode.py and bench/gpu.py: 4 on CPU (a forward of 40 tokens costs
    # ~2.5x one token there), 8 on GPU (at 16 rows x 40 candidates an 8B forward is
    # compute-bound: all at once measured 33.5 ms a step vs 20.9 for chunks of 8 on an H200).
    chunk_size: int | None = None
    # After a row's first chunk is all rejected, judge all its remaining candidates in one
    # forward (at most two rounds: each round costs a sync and a launch). None: on for GPU.
    rest_at_once: bool | None = None
    # Rows whose agent keeps accepting the top-1 try it alone first (None: on for CPU only).
    probe_top1: bool | None = None
    # A new request starts from its agent's recent rates (top-1 accepted, all rejected) instead
    # of neutral ones, so its first tokens already get the agent's usual round sizes (e.g. the
    # top-1 alone). Training turns it off, like `defer_undecided` (the recipe's call order).
    agent_priors: bool = True
    # One forward per step: a row whose candidates were all rejected goes on in the next step
    # (step.py) instead of holding every other row for another round. Training turns it off:
    # its episode agents share one random generator, so the order of their calls (which this
    # changes) is part of a recipe's bit-for-bit reproducibility.
    defer_undecided: bool = True
    max_prefill_tokens: int = 4096  # prompt tokens prefilled per step (keeps inter-token latency)
    # K/V of prompt prefixes kept for reuse, in tokens (0: off); see prefix_cache.py.
    prefix_cache_tokens: int = 0
    prefix_block_size: int = 8  # SmolLM2's chat template shares 24 tokens across requests
    # Prompts admitted in one step share one prefill forward (runner.prefill_batch). Off keeps
    # each prompt's prefill numerically independent of what else arrives (train/eval/generate).
    batch_prefill: bool = False
    # KV cache budget in bytes (kv_cache.kv_budget: None → on a GPU `gpu_memory_utilization`
    # of its memory, on a CPU every slot at full length, committed as written).
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    # On a CPU in float32, run each projection as a batched matmul over slices of its output
    # rows (weights.split_for_cpu: every thread reads weights; measured ~2x on one-row matmuls).
    split_matmuls: bool = True
    # On a CPU, decode forwards of up to 64 tokens and the LM head on the chosen states in C
    # (native/; float32 and bfloat16 Llama-family models): a step is one call instead of
    # ~1,300 eager ops.
    native_decode: bool = True
    # Decode forwards padded to shape buckets and replayed as CUDA graphs (graphs.py). None: on
    # for a GPU (`--enforce-eager` turns it off); True on a CPU runs the padding eagerly (tests).
    captured_steps: bool | None = None


class LLMEngine:
    def __init__(self, lm: LoadedModel, config: EngineConfig = EngineConfig()):
        self.lm = lm
        self.config = config
        budget = kv_budget(config.kv_cache_memory, config.gpu_memory_utilization, lm.device)
        captured = (
            config.captured_steps if config.captured_steps is not None else lm.device.type == "cuda"
        )
        self.runner = ModelRunner(lm, config.max_running, config.split_matmuls, budget,
                                  config.prefix_cache_tokens, captured,
                                  config.native_decode)  # fmt: skip
        if config.native_decode and lm.device.type == "cpu" and self.runner.native is None:
            log.warning("native decoding is off: %s", self.runner.native_off_reason)
        for note in self.runner.kv_plan.notes:
            log.warning("%s", note)
        self.max_running = self.runner.kv_plan.slots  # admission: a free slot holds a sequence
        # torch's CPU threads as the thread building the engine sees them (in the server, the
        # engine thread that also steps it; reported in /metrics)
        self.torch_threads = torch.get_num_threads()
        self.weight_bytes = lm.weight_bytes
        self.prefix_cache = PrefixCache(config.prefix_cache_tokens, config.prefix_block_size)
        on_cpu = lm.device.type == "cpu"
        self.chunk_size = (
            config.chunk_size
            if config.chunk_size is not None
            else (CPU_CHUNK_SIZE if on_cpu else GPU_CHUNK_SIZE)
        )
        self.rest_at_once = config.rest_at_once if config.rest_at_once is not None else not on_cpu
        self.probe_top1 = config.probe_top1 if config.probe_top1 is not None else on_cpu
        self.max_model_len = self.runner.max_len
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._aborts: set[str] = set()
        self._accepting = True
        self.running: list[Sequence] = []
        self.num_steps = 0
        # Each agent's recent (rank0_rate, fallback_rate) over all its rows (`agent_priors`);
        # weak keys: an agent swapped out of the registry is forgotten with it.
        self._agent_rates: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # Receives a step's outputs known before its forward (`step`); None: step returns them.
        self.on_decided: Callable[[list[RequestOutput]], None] | None = None

    # ---- intake (any thread) ------------------------------------------------------------

    def validate(self, request: Request) -> None:
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidRequestError("the prompt is empty", "prompt")
        if min(ids) < 0 or max(ids) >= self.lm.vocab_size:
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.lm.vocab_size})",
                                      "prompt")  # fmt: skip
        total = len(ids) + request.params.max_new_tokens
        if total > self.max_model_len:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{len(ids)} prompt tokens + {request.params.max_new_tokens} new tokens were "
                f"requested ({total}); shorten the prompt or lower max_tokens", "messages",
            )  # fmt: skip
        allowed = request.params.allowed_token_ids or ()
        if any(not 0 <= t < self.lm.vocab_size for t in allowed):
            raise InvalidRequestError(
                f"allowed_token_ids must be in [0, {self.lm.vocab_size})", "allowed_token_ids"
            )
        if any(not 0 <= t < self.lm.vocab_size for t, _ in request.params.logit_bias):
            raise InvalidRequestError(
                f"logit_bias token ids must be in [0, {self.lm.vocab_size})", "logit_bias"
            )
        agent = request.agent
        if agent is not None and request.params.mara_top_k() > MAX_CANDIDATES:
            raise InvalidRequestError(f"top_k must be <= {MAX_CANDIDATES} with an agent", "top_k")
        if agent is not None and agent.hidden_size != self.lm.hidden_size:
            raise InvalidRequestError(
                f"agent {agent.name!r} has hidden size {agent.hidden_size}, model has "
                f"{self.lm.hidden_size}", "model",
            )  # fmt: skip

    def add_request(self, request: Request) -> None:
        """Queue a request; raises for invalid input, a full queue, or a stopped engine."""
        self.add_requests([request])

    def add_requests(self, requests: list[Request]) -> None:
        """Queue several requests (the choices of one API request) all or none: every one is
        validated and the queue must hold them all, else nothing is queued and this raises."""
        for request in requests:
            self.validate(request)
        with self._lock:
            if not self._accepting:
                raise EngineNotReadyError("the engine is shutting down")
            if len(self._waiting) + len(requests) > self.config.max_waiting:
                raise QueueFullError(f"waiting queue is full ({self.config.max_waiting})")
            self._waiting.extend(requests)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.add(request_id)

    def stop_accepting(self) -> None:
        with self._lock:
            self._accepting = False

    # ---- state --------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running or self._waiting or self._aborts)

    def request_ids(self) -> set[str]:
        """Ids of the requests the engine holds (waiting or running)."""
        with self._lock:
            waiting = {r.request_id for r in self._waiting}
        return waiting | {s.request_id for s in self.running}

    def stats(self) -> dict:
        return {
            "running": self.num_running, "waiting": self.num_waiting,
            "max_running": self.max_running, "max_waiting": self.config.max_waiting,
            "kv_cache_capacity": self.runner.cache.capacity, "steps": self.num_steps,
            "kv_cache_bytes": self.runner.cache.nbytes, "kv_cache_slots": self.max_running,
            "kv_cache_tokens": sum(s.length for s in list(self.running)),
            "torch_threads": self.torch_threads, "model_weight_bytes": self.weight_bytes,
            "native_decode": int(self.runner.native is not None),
            "native_decode_forwards": self.runner.native.calls if self.runner.native else 0,
            **self.prefix_cache.stats(),
        }  # fmt: skip

    # ---- the loop (engine thread) -------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """One engine step; returns its outputs. With `on_decided` set, the outputs known
        before the step's forward (aborts, failed admissions, and the tokens decided before the
        forward, `_plan`) go to it first, and only the rest is returned."""
        outputs = self._apply_aborts()
        outputs += self._admit()
        if self.running:
            plan, decided = self._plan()
            outputs += decided
            if self.on_decided is not None and outputs:
                self.on_decided(outputs)
                outputs = []
            outputs += self._decode(plan)
        self.num_steps += 1
        return outputs

    def _apply_aborts(self) -> list[RequestOutput]:
        with self._lock:
            aborts, self._aborts = self._aborts, set()
            if not aborts:
                return []
            dropped = [r for r in self._waiting if r.request_id in aborts]
            self._waiting = deque(r for r in self._waiting if r.request_id not in aborts)
        outs = [
            RequestOutput(
                r.request_id, [], [], True, "abort", num_prompt_tokens=len(r.prompt_token_ids)
            )
            for r in dropped
        ]
        for seq in [s for s in self.running if s.request_id in aborts]:
            seq.finish_reason = "abort"
            outs.append(self._final_output(seq, [], []))
            self._release(seq)
        return outs

    def _admit(self) -> list[RequestOutput]:
        """Move waiting requests into free slots and prefill them (within the step's budget).

        A prompt identical to one admitted in the same call (n samples of one prompt, e.g.
        training episodes) copies its KV instead of recomputing it. A request whose prefill
        fails gets an error output and nothing else is affected; the running batch stays dense.
        """
        admitted = self._pop_admissible()
        if not admitted:
            return []
        # max_new_tokens 0 (completions' echo, scoring a prompt): ends here, nothing to compute
        outs = [self._prompt_only(r) for r in admitted if r.params.max_new_tokens == 0]
        admitted = [r for r in admitted if r.params.max_new_tokens > 0]
        seqs, computed, twins = [], [], []
        first: dict[tuple[int, ...], Sequence] = {}
        for request in admitted:
            seq = Sequence(request, len(self.running) + len(seqs), self.lm.eos_token_ids,
                           self.lm.device)  # fmt: skip
            if self.config.agent_priors and request.agent in self._agent_rates:
                seq.rank0_rate, seq.fallback_rate = self._agent_rates[request.agent]
            seq.first_scheduled_time = time.monotonic()
            seqs.append(seq)
            key = tuple(request.prompt_token_ids)
            if key in first:
                twins.append((seq, first[key]))
            else:
                first[key] = seq
                computed.append(seq)
        failed = self._prefill(computed)
        if computed and len(failed) == len(computed):
            self._check_alive(next(iter(failed.values())))
        for seq, source in twins:
            if id(source) in failed:
                failed[id(seq)] = failed[id(source)]
                continue
            self.runner.cache.move(source.slot, seq.slot, seq.num_prompt_tokens)
            seq.next_logits = source.next_logits  # read-only until its first step
        for seq in seqs:
            n = seq.num_prompt_tokens
            if id(seq) in failed:
                outs.append(RequestOutput(seq.request_id, [], [], True, "error",
                                          str(failed[id(seq)]), num_prompt_tokens=n))  # fmt: skip
                continue
            slot = len(self.running)
            if seq.slot != slot:  # a failed request before it left a hole: keep slots dense
                self.runner.cache.move(seq.slot, slot, n)
                seq.slot = slot
            seq.length = n
            self.running.append(seq)
        return outs

    def _prompt_only(self, request: Request) -> RequestOutput:
        return RequestOutput(request.request_id, [], [], True, "length",
                             num_prompt_tokens=len(request.prompt_token_ids),
                             queue_time=time.monotonic() - request.arrival_time)  # fmt: skip

    def _pop_admissible(self) -> list[Request]:
        """Waiting requests for the free slots, within `max_prefill_tokens` of tokens actually
        prefilled: a prompt's cached prefix costs nothing, nor does a prompt identical to one
        already taken; the first request is always taken. A prompt-only request
        (max_new_tokens 0, `_prompt_only`) takes neither a slot nor budget."""
        taken: list[Request] = []
        keys: set[tuple[int, ...]] = set()
        budget = self.config.max_prefill_tokens
        free = self.max_running - len(self.running)
        with self._lock:
            while self._waiting:
                request = self._waiting[0]
                if request.params.max_new_tokens == 0:
                    taken.append(self._waiting.popleft())
                    continue
                if free == 0:
                    break
                ids = request.prompt_token_ids
                key = tuple(ids)
                cost = 0 if key in keys else len(ids) - self.prefix_cache.cached_tokens(ids)
                if cost > budget and budget < self.config.max_prefill_tokens:
                    break  # this step's prefill budget is spent; the next step takes it
                budget -= cost
                free -= 1
                keys.add(key)
                taken.append(self._waiting.popleft())
        return taken

    def _prefill(self, seqs: list[Sequence]) -> dict[int, Exception]:
        """Prefill each sequence's prompt into its slot (from cached prefix blocks where the
        prefix cache has them); returns id(seq) → error for the ones that failed. With
        `batch_prefill` the prompts share one forward; if that fails, they are retried one by
        one so only the faulty request fails."""
        items = []
        for seq in seqs:
            ids = seq.request.prompt_token_ids
            blocks = self.prefix_cache.match(ids)
            items.append((seq, ids, self.prefix_cache.load(self.runner.cache, seq.slot, blocks)))
        if self.config.batch_prefill and len(items) > 1:
            try:
                hidden = self.runner.prefill_batch([(s.slot, ids, a) for s, ids, a in items])
                self._prefilled(items, hidden)
                return {}
            except Exception:
                log.exception("batched prefill failed; prefilling the prompts one by one")
        failed: dict[int, Exception] = {}
        for item in items:
            seq, ids, start = item
            try:
                self._prefilled([item], self.runner.prefill(seq.slot, ids, start)[None])
            except Exception as e:  # one bad request must not take the engine down
                log.exception("prefill failed for %s", seq.request_id)
                failed[id(seq)] = e
        return failed

    def _prefilled(self, items: list, hidden: torch.Tensor) -> None:
        logits = self.runner.logits(hidden)
        for (seq, ids, _), row in zip(items, logits, strict=True):
            self.prefix_cache.store(self.runner.cache, seq.slot, ids)
            seq.next_logits = row

    def _plan(self) -> tuple[list[tuple[Sequence, StepRow]], list[RequestOutput]]:
        """Plan every running row's step (`step.plan_rows`) and hand out the tokens known
        before the forward: a plain row's token is sampled from the last forward's logits, and
        the forward only computes what comes after it — sending it now takes a whole forward
        off time to first token and off every token's latency. A row that ends on such a token
        needs no forward at all. (A MARA row keeps one cadence: its tokens go out after the
        forward, even the rare one its top-k/top-p leaves without a choice — sent early, its
        next token would come two forwards later.) A row whose planning fails (its logits
        processing) ends with an error; the others go on."""
        # Seeded rows' generator states before planning: a row planned alone after the batch's
        # planning failed draws exactly what it would have drawn (never depends on a neighbour).
        rng = {id(s): s.generator.get_state() for s in self.running if s.generator is not None}
        try:
            rows: list[StepRow | Exception] = list(plan_rows(self.running))
        except Exception:
            log.exception("planning the step failed; planning the rows one by one")
            rows = []
            for seq in self.running:
                if seq.generator is not None:
                    seq.generator.set_state(rng[id(seq)])
                try:
                    rows += plan_rows([seq])
                except Exception as e:
                    log.exception("planning failed for %s", seq.request_id)
                    rows.append(e)
            if all(isinstance(row, Exception) for row in rows):
                self._check_alive(rows[0])  # type: ignore[arg-type]
        planned, outs = {}, []
        for seq, row in zip(self.running, rows, strict=True):
            trace = None
            if seq.agent is None and not isinstance(row, Exception):
                try:
                    trace = decide_early(seq, row)
                    seq.accept_constrained(trace.token_id)  # before the token is sent
                except Exception as e:
                    log.exception("request %s: token not accepted", seq.request_id)
                    row = e
            if isinstance(row, Exception):
                outs.append(self._failed(seq, row))
                continue
            if trace is not None:
                if seq.finish_reason_after(trace.token_id) is not None:
                    seq.append(trace.token_id, trace, accepted=True)  # finished: no forward
                    outs.append(self._output(seq, [trace.token_id], [trace]))
                    continue
                outs.append(self._output(seq, [trace.token_id], [trace], num_new=1))
                seq.sent_ahead = trace
            planned[id(seq)] = row
        # Release the ended rows now, so the forward runs over dense slots 0..R-1 (a view of
        # the cache, not a gather of the rows' K/V in every layer).
        for seq in [s for s in self.running if id(s) not in planned]:
            self._release(seq)
        return [(seq, planned[id(seq)]) for seq in self.running], outs

    def _decode(self, plan: list[tuple[Sequence, StepRow]]) -> list[RequestOutput]:
        seqs, rows = [s for s, _ in plan], [r for _, r in plan]
        results: list[tuple[Sequence, StepRow, TokenTrace | None | Exception]] = []
        try:
            results = list(zip(seqs, rows, self._decode_step(seqs, rows), strict=True))
        except Exception:
            # Isolate the failure: step each row alone (from the same plan: the same tokens);
            # only rows that fail alone are failed.
            log.exception("batched decode step failed; retrying rows one by one")
            for seq, row in plan:
                try:
                    results.append((seq, row, self._decode_step([seq], [row])[0]))
                except Exception as e:
                    log.exception("decode failed for %s", seq.request_id)
                    results.append((seq, row, e))
            errors = [res for *_, res in results if isinstance(res, Exception)]
            if results and len(errors) == len(results):
                self._check_alive(errors[0])
        outs = []
        for seq, row, res in results:
            if row.trace is not None:  # already sent (`_plan`): record it, report only faults
                seq.append(row.trace.token_id, row.trace, accepted=True)
                seq.sent_ahead = None
                if isinstance(res, Exception):
                    outs.append(self._failed(seq, res))
                continue
            if isinstance(res, Exception):
                outs.append(self._failed(seq, res))
            elif res is not None:  # None: undecided, its next candidates go into the next step
                if seq.agent is not None and res.num_candidates > 1:
                    self._agent_rates[seq.agent] = (seq.rank0_rate, seq.fallback_rate)
                outs.append(self._appended(seq, res))
        for seq in [s for s in self.running if s.finish_reason is not None]:
            self._release(seq)
        return outs

    def _appended(self, seq: Sequence, trace: TokenTrace) -> RequestOutput:
        """Record a token and return its output (an error output if the request's constraint
        refused it: that request only)."""
        try:
            seq.append(trace.token_id, trace)
        except Exception as e:
            log.exception("request %s: token not accepted", seq.request_id)
            return self._failed(seq, e)
        return self._output(seq, [trace.token_id], [trace])

    def _failed(self, seq: Sequence, error: Exception) -> RequestOutput:
        seq.finish_reason = "error"
        return self._final_output(seq, [], [], error=str(error) or type(error).__name__)

    def _decode_step(self, seqs: list[Sequence], rows: list[StepRow]) -> list[TokenTrace | None]:
        """`decode_step` with this engine's candidate policy (the batch, or one row retried)."""
        if not seqs:
            return []
        return decode_step(self.runner, seqs, rows, self.chunk_size, self.probe_top1,
                           self.rest_at_once, self.config.defer_undecided)  # fmt: skip

    # ---- faults -------------------------------------------------------------------------

    def self_check(self) -> bool:
        """Can the model still run? One token through the runner and the LM head, no agent and
        no sampling, at a scratch position (past slot 0's length, never read unmasked). Tells
        a request's own fault (its agent, its input) from the engine's (the device, the
        weights) when every request of a step failed."""
        try:
            # past slot 0's kept positions (an undecided row keeps its rank-0 K/V at `length`)
            length = self.running[0].kv_length if self.running else 0
            device = self.runner.device
            hidden = self.runner.forward_tokens(
                1,
                torch.tensor([length], device=device),
                torch.tensor([self.lm.eos_token_ids[0] if self.lm.eos_token_ids else 0],
                             device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                torch.zeros(1, dtype=torch.long, device=device),
                1,
            )  # fmt: skip
            return bool(torch.isfinite(self.runner.logits(hidden)).all())
        except Exception:
            log.exception("engine self-check failed")
            return False

    def _check_alive(self, cause: Exception) -> None:
        """Every request of this step failed: raise EngineDeadError unless the model runs."""
        if not self.self_check():
            raise EngineDeadError(f"the model can no longer run: {type(cause).__name__}") from (
                cause
            )

    def fail_running(self, error: str) -> list[RequestOutput]:
        """End every running request with an error and free all slots (after a step failed in
        a way the engine could not isolate). Waiting requests stay queued."""
        outs = []
        for seq in self.running:
            if seq.sent_ahead is not None:  # sent before the forward that failed: it counts
                seq.append(seq.sent_ahead.token_id, seq.sent_ahead, accepted=True)
            seq.finish_reason = "error"
            outs.append(self._final_output(seq, [], [], error=error))
        self.running.clear()
        return outs

    def fail_all(self) -> None:
        """The engine is dead: stop admission and drop every request, running and waiting (the
        caller ends their streams)."""
        with self._lock:
            self._accepting = False
            self._waiting.clear()
            self._aborts.clear()
        self.running.clear()

    def _output(
        self, seq: Sequence, ids: list[int], traces: list[TokenTrace], num_new: int = 0
    ) -> RequestOutput:
        """The output of `ids`; `num_new`: of them, how many `seq` has not recorded yet."""
        out = RequestOutput(
            seq.request_id, ids, traces, seq.finish_reason is not None, seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=len(seq.output_ids) + num_new,
        )  # fmt: skip
        if not seq.reported_queue_time:
            out.queue_time = seq.first_scheduled_time - seq.request.arrival_time
            seq.reported_queue_time = True
        return out

    def _final_output(self, seq, ids, traces, error: str | None = None) -> RequestOutput:
        out = self._output(seq, ids, traces)
        out.finished, out.finish_reason, out.error = True, seq.finish_reason, error
        return out

    def _release(self, seq: Sequence) -> None:
        """Remove a sequence from the batch; the last row moves into its slot (dense slots)."""
        i = self.running.index(seq)
        last = self.running.pop()
        if last is not seq:
            self.runner.cache.move(last.slot, i, last.kv_length)
            last.slot = i
            self.running[i] = last

    # ---- convenience --------------------------------------------------------------------

    def generate(
        self, requests: list[Request], on_finish: Callable[[str], None] | None = None
    ) -> dict[str, tuple[list[int], list[TokenTrace], str]]:
        """Run requests to completion (all queued at once); returns id → (ids, traces, reason).

        `on_finish(request_id)` is called as each request finishes (e.g. a progress bar)."""
        if self.on_decided is not None:  # its outputs would go there, not into the results
            raise RuntimeError("generate() cannot run an engine that an AsyncEngine drives")
        results: dict[str, Result] = {r.request_id: ([], [], "") for r in requests}
        for r in requests:
            self.add_request(r)
        while self.has_work():
            for out in self.step():
                ids, traces, _ = results[out.request_id]
                ids += out.new_token_ids
                traces += out.traces
                if out.finished:
                    results[out.request_id] = (ids, traces, out.finish_reason or "")
                    if on_finish is not None:
                        on_finish(out.request_id)
        return results
