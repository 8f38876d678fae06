"""GPU decode benchmark: ms per decode step vs the memory-bandwidth floor, in one command.

    python bench/gpu.py                        # on CUDA: 8B-class random model + SmolLM2
    python bench/gpu.py --device cpu --tiny    # CI-sized run of the same code on a CPU

Needs no download: the 8B-class model is instantiated from its config (Llama-3.1-8B shape:
hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256) with random weights, in
bf16 by default. The embedded SmolLM2 runs too.

For each model and batch size (1/4/16 rows, each with a `--context`-token prompt) it measures
the engine's decode step (milliseconds, after the prefill, the device synchronised around the
timed steps) for plain decoding and for MARA with a random agent calibrated to reject about
half of the candidates (k = 40): the engine's default for the device (GPU: chunks of 8, then
all the rest in a second round), all candidates in one forward, and chunks of 8; plain decoding
also with CUDA graphs off ("plain eager", `--enforce-eager`), side by side. The bandwidth
floor of a plain step is (weight bytes + the KV bytes the step reads) ÷ the device's copy
bandwidth, measured here with one large device-to-device copy; `floor_ratio` = step ÷ floor
(1.0 = memory-bound at full bandwidth). It also checks parity: tiny-model tokens from the
engine on this device vs the serial reference on the same device (float32: identical).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mara_serve.engine.agent import Agent, AgentCard, AgentNetwork  # noqa: E402
from mara_serve.engine.engine import EngineConfig, LLMEngine  # noqa: E402
from mara_serve.engine.loading import LoadedModel  # noqa: E402
from mara_serve.engine.reference import reference_generate  # noqa: E402
from mara_serve.engine.request import Request  # noqa: E402
from mara_serve.engine.runner import MAX_CANDIDATES  # noqa: E402
from mara_serve.engine.sampling import SamplingParams  # noqa: E402

# Llama-3.1-8B's shape (config.json of meta-llama/Llama-3.1-8B-Instruct), weights random.
LLAMA_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
)  # fmt: skip
# A tiny Llama with the same structure (GQA), for CI and parity.
TINY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
    tie_word_embeddings=False,
)  # fmt: skip
# SmolLM2-135M's shape, for a machine without the embedded weights (a GPU box with no network).
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)  # fmt: skip
TOP_K = 40
CHUNK = 8


def random_model(name: str, shape: dict, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """A Llama model with random weights built directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**shape, bos_token_id=0, eos_token_id=1, initializer_range=0.02)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    return LoadedModel(
        model=model, tokenizer=None, name=name, device=device, dtype=dtype,
        hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size,
        max_model_len=cfg.max_position_embeddings, eos_token_ids=(1,),
    )  # fmt: skip


def smollm2(device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """The embedded default model (converted from the GGUF the package embeds; no network), or
    random weights of its shape where it cannot be fetched (the speed is the same)."""
    from mara_serve.engine.default_model import default_cache_dir
    from mara_serve.engine.loading import ModelConfig, load_model

    try:
        return load_model(ModelConfig(device=str(device), dtype=str(dtype).removeprefix("torch."),
                                      cache_dir=default_cache_dir()))  # fmt: skip
    except Exception as e:  # this machine cannot fetch it: same shape, random weights
        print(f"SmolLM2 weights unavailable ({type(e).__name__}: {e}); random weights of its "
              "shape instead", file=sys.stderr)  # fmt: skip
        return random_model("smollm2-135m-shape-random", SMOLLM2, device, dtype)


def calibrated_agent(lm: LoadedModel, reject_rate: float = 0.5) -> Agent:
    """A random agent rejecting about `reject_rate` of this model's final hidden states."""
    torch.manual_seed(1)
    net = AgentNetwork(lm.hidden_size, 1024).to(lm.device)
    with torch.inference_mode():
        ids = torch.randint(2, lm.vocab_size, (4, 64), device=lm.device)
        states = lm.model.model(ids).last_hidden_state.reshape(-1, lm.hidden_size).float()
    with torch.no_grad():
        net.output_linear.weight.mul_(30.0)
        margin = net(states)
        diff = margin[:, 1] - margin[:, 0]
        net.output_linear.bias[1] = -torch.quantile(diff, reject_rate)
    return Agent(net, AgentCard(f"random-{int(reject_rate * 100)}%", lm.hidden_size))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms(
    lm: LoadedModel,
    rows: int,
    context: int,
    steps: int,
    agent: Agent | None,
    chunk: int | None,
    captured: bool | None = None,
) -> tuple[float, float]:
    """Ms per decode step over `steps` steps (after prefill and 4 warm-up steps) with `rows`
    running requests of a `context`-token prompt — the median step time scaled by the rows'
    tokens a step owes over those it emitted (a MARA row left undecided emits nothing in a step,
    engine.py), so it is the time per token of every row; and the mean candidates per token.
    `captured`: EngineConfig.captured_steps (None: the engine's default for the device)."""
    engine = LLMEngine(lm, EngineConfig(max_running=rows, chunk_size=chunk, probe_top1=False,
                                        captured_steps=captured,
                                        rest_at_once=None if chunk is None else False))  # fmt: skip
    gen = torch.Generator().manual_seed(rows)
    params = SamplingParams(max_new_tokens=steps + 6, ignore_eos=True, temperature=0.0,
                            top_k=TOP_K if agent is not None else None)  # fmt: skip
    for r in range(rows):
        prompt = torch.randint(2, lm.vocab_size, (context,), generator=gen).tolist()
        engine.add_request(Request(f"r{r}", prompt, params, agent))
    engine.step()  # prefill (+ the first token)
    for _ in range(4):  # warm-up (on a GPU: the first CUDA graphs are captured)
        engine.step()
    times, cands, emitted = [], [], 0
    for _ in range(steps):
        sync(lm.device)
        t0 = time.perf_counter()
        outs = engine.step()
        sync(lm.device)
        times.append((time.perf_counter() - t0) * 1e3)
        cands += [len(t.candidates) for o in outs for t in o.traces if t.candidates]
        emitted += sum(len(o.new_token_ids) for o in outs)
    while engine.has_work():
        engine.step()
    del engine, outs
    release(lm.device)  # the next engine sizes its KV cache from the memory free now
    owed = rows * steps
    return statistics.median(times) * owed / max(emitted, 1), (
        statistics.mean(cands) if cands else 1.0
    )


def sig(x: float) -> float:
    """x to 4 significant digits (a tiny model's floor is microseconds)."""
    return float(f"{x:.4g}")


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def profile_steps(lm: LoadedModel, agent: Agent | None, path: Path, steps: int = 3) -> None:
    """Append a torch.profiler table of `steps` decode steps at one row (self CPU time first:
    on a GPU the host-side gaps, launches and syncs, are what the captured step must remove)."""
    from torch.profiler import ProfilerActivity, profile

    engine = LLMEngine(lm, EngineConfig(max_running=1, probe_top1=False))
    params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True, temperature=0.0,
                            top_k=TOP_K if agent is not None else None)  # fmt: skip
    engine.add_request(Request("p", list(range(2, 130)), params, agent))
    for _ in range(3):
        engine.step()
    activities = [ProfilerActivity.CPU]
    if lm.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(lm.device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(lm.device)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with path.open("a") as f:
        f.write(f"\n## {lm.name}, {'MARA k=40' if agent else 'plain'}, {steps} steps, 1 row\n")
        f.write(table)
    while engine.has_work():
        engine.step()
    del engine
    release(lm.device)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Bytes/s of one large device-to-device copy (read + write), best of 5."""
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * x.numel() * 4 / best


def step_bytes(lm: LoadedModel, rows: int, context: int) -> int:
    """Bytes a plain decode step must read: every weight but the input embedding (only `rows`
    rows of it are read; counted once if tied to the LM head) and the K/V of the context."""
    model = lm.model
    embed = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.get_output_embeddings().weight is not embed:
        weights -= embed.numel() * embed.element_size()
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * embed.element_size()
    return weights + rows * context * kv


def parity(device: torch.device, dtype: torch.dtype) -> dict:
    """Greedy tokens of the tiny model, engine (batched, MARA and plain) vs serial reference."""
    lm = random_model("tiny", {**TINY, "vocab_size": 128}, device, dtype)
    agent = calibrated_agent(lm).to(device)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 128, (n,), generator=gen).tolist() for n in (3, 7, 12, 5)]
    reqs = [Request(f"p{i}", p, params, agent if i % 2 == 0 else None)
            for i, p in enumerate(prompts)]  # fmt: skip
    got = LLMEngine(lm, EngineConfig(max_running=4)).generate(reqs)
    same = sum(
        got[r.request_id][0] == reference_generate(lm.model, r.prompt_token_ids, r.agent, params,
                                                   lm.eos_token_ids)[0]
        for r in reqs
    )  # fmt: skip
    return {"sequences": len(reqs), "identical": int(same), "dtype": str(dtype).split(".")[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny random model only (CI)")
    ap.add_argument("--rows", default="1,4,16", help="batch sizes")
    ap.add_argument("--context", type=int, default=None, help="prompt tokens per row")
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps")
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="also write a torch.profiler table of a few one-row steps here",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --tiny")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    context = args.context or (32 if args.tiny else 1024)
    steps = args.steps or (4 if args.tiny else 20)
    rows_list = [int(r) for r in args.rows.split(",")]
    started = time.monotonic()
    bandwidth = copy_bandwidth(device, 64 if args.tiny else 2048)

    models: list[LoadedModel] = []
    if args.tiny:
        models.append(random_model("tiny-llama", TINY, device, dtype))
    else:
        models.append(random_model("llama-3.1-8b-shape-random", LLAMA_8B, device, dtype))
        models.append(smollm2(device, dtype))

    results = []
    for lm in models:
        agent = calibrated_agent(lm).to(device)
        if args.profile is not None:
            profile_steps(lm, None, args.profile)
            profile_steps(lm, agent, args.profile)
        for rows in rows_list:
            floor_ms = step_bytes(lm, rows, context) / bandwidth * 1e3
            runs = {
                "plain": (None, None, None),
                "plain eager": (None, None, False),  # CUDA graphs off (--enforce-eager)
                "mara default": (agent, None, None),  # the engine's choice for the device
                "mara all-at-once": (agent, MAX_CANDIDATES, None),
                f"mara chunk={CHUNK}": (agent, CHUNK, None),
            }
            for mode, (a, chunk, captured) in runs.items():
                ms, cands = decode_ms(lm, rows, context, steps, a, chunk, captured)
                results.append({
                    "model": lm.name, "rows": rows, "mode": mode, "ms_per_step": sig(ms),
                    "floor_ms": sig(floor_ms), "floor_ratio": sig(ms / floor_ms),
                    "candidates_per_token": round(cands, 1),
                })  # fmt: skip
    del models, lm, agent
    release(device)

    parities = [parity(device, torch.float32)]
    if dtype != torch.float32:
        parities.append(parity(device, dtype))

    print(f"\n{'model':<28} {'rows':>4} {'mode':<18} {'ms/step':>9} {'floor ms':>9} "
          f"{'x floor':>8} {'cands':>6}")  # fmt: skip
    for r in results:
        print(
            f"{r['model']:<28} {r['rows']:>4} {r['mode']:<18} {r['ms_per_step']:>9.2f} "
            f"{r['floor_ms']:>9.2f} {r['floor_ratio']:>8.2f} {r['candidates_per_token']:>6.1f}"
        )
    for p in parities:
        print(f"parity ({p['dtype']}): {p['identical']}/{p['sequences']} sequences identical "
              "to the serial reference")  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()  # fmt: skip
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    print(json.dumps({
        "bench": "gpu", "device": str(device), "device_name": name or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."), "context": context, "steps": steps,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1), "results": results, "parity": parities,
        "torch": torch.__version__, "commit": commit,
        "wall_s": round(time.monotonic() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
