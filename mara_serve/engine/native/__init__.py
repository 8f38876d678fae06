"""The native decode forward for CPUs (decode_cpu.c), built on first use.

A decode step in eager PyTorch is ~1,300 small ops whatever its token count; on a CPU their
dispatch cost as much as reading the weights, and one-row bf16 matmuls ran at half the memory
bandwidth. `NativeDecoder` runs a step of N tokens (rows x candidates, each a candidate at its
row's next position: the tree attention of runner.forward_tokens) as ONE call into C over the
runner's own weights and KV cache (no copies), with the same rounding as the eager runner
(decode_cpu.c says how), and the LM head on the chosen states likewise. The runner uses it up
to `NATIVE_MAX_TOKENS` tokens a step (bench/native.py: the crossover); larger steps, prefill,
GPUs, float16 and int8 stay on the eager runner.

The C file is compiled with the machine's C compiler (`cc`, `-march=native`, OpenMP) the first
time it is needed and cached under `$XDG_CACHE_HOME/mara-serve/native` (or `MARA_NATIVE_CACHE`),
keyed by the source, the compiler flags and the CPU's feature flags. Where there is no compiler
(the container image's runtime), `prebuild()` — run at image build time, `python -m
mara_serve.engine.native` — has left portable builds (x86-64-v4 with and without AVX512-BF16,
v3, baseline) next to this file, and the best one this CPU runs is loaded. `build()` raises
`NativeBuildError` when neither works; the engine then logs why and serves on the eager runner,
and `/metrics` says which path runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import nn

from mara_serve.engine.loading import cpu_flags

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("decode_cpu.c")
_X86 = platform.machine().lower() in ("x86_64", "amd64")
# -mprefer-vector-width is an x86 option (gcc elsewhere refuses it)
BASE_CFLAGS = ("-O3", *(("-mprefer-vector-width=512",) if _X86 else ()), "-fopenmp", "-shared",
               "-fPIC")  # fmt: skip
CFLAGS = (*BASE_CFLAGS, "-march=native")
PREBUILT_DIR = Path(__file__).with_name("prebuilt")

# Portable builds, best first: name → (-march flags, the /proc/cpuinfo flags a CPU needs).
_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
_V4 = _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
PORTABLE_BUILDS: dict[str, tuple[tuple[str, ...], frozenset[str]]] = {
    "x86-64-v4-bf16": (("-march=x86-64-v4", "-mavx512bf16"), frozenset(_V4 | {"avx512_bf16"})),
    "x86-64-v4": (("-march=x86-64-v4",), frozenset(_V4)),
    "x86-64-v3": (("-march=x86-64-v3",), frozenset(_V3)),
    "x86-64": (("-march=x86-64",), frozenset()),
}


class NativeBuildError(RuntimeError):
    """The native decode library could not be compiled or loaded."""


class _Decoder(ctypes.Structure):
    _fields_ = [
        ("n_layers", ctypes.c_int),
        ("hidden", ctypes.c_int),
        ("n_heads", ctypes.c_int),
        ("n_kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("inter", ctypes.c_int),
        ("bf16", ctypes.c_int),
        ("n_threads", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("slots", ctypes.c_long),
        ("capacity", ctypes.c_long),
        ("ln1_w", ctypes.POINTER(ctypes.c_void_p)),
        ("ln2_w", ctypes.POINTER(ctypes.c_void_p)),
        ("ln1_eps", ctypes.POINTER(ctypes.c_float)),
        ("ln2_eps", ctypes.POINTER(ctypes.c_float)),
        ("qkv_w", ctypes.POINTER(ctypes.c_void_p)),
        ("qkv_b", ctypes.POINTER(ctypes.c_void_p)),
        ("o_w", ctypes.POINTER(ctypes.c_void_p)),
        ("o_b", ctypes.POINTER(ctypes.c_void_p)),
        ("gate_up_w", ctypes.POINTER(ctypes.c_void_p)),
        ("gate_up_b", ctypes.POINTER(ctypes.c_void_p)),
        ("down_w", ctypes.POINTER(ctypes.c_void_p)),
        ("down_b", ctypes.POINTER(ctypes.c_void_p)),
        ("norm_w", ctypes.c_void_p),
        ("norm_eps", ctypes.c_float),
        ("embed", ctypes.c_void_p),
        ("keys", ctypes.c_void_p),
        ("values", ctypes.c_void_p),
        ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p),
    ]


def cache_dir() -> Path:
    root = os.environ.get("MARA_NATIVE_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "mara-serve" / "native"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None


def library_path() -> Path:
    """Where this source, compiler, flags and CPU's library lives in the cache."""
    key = hashlib.sha256(SOURCE.read_bytes())
    cpu = (platform.machine(), *sorted(cpu_flags()))
    key.update(" ".join((compiler() or "", *CFLAGS, *cpu)).encode())
    return cache_dir() / f"decode_cpu-{key.hexdigest()[:16]}.so"


def compile_library(target: Path, cflags: tuple[str, ...] = CFLAGS, source: Path = SOURCE) -> None:
    """Compile decode_cpu.c (or another version of it: bench/native.py --baseline-ref) to
    `target` (atomically: concurrent processes never load half a file). Raises
    NativeBuildError with the compiler's message."""
    cc = compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (set CC, or install gcc)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError as e:  # e.g. a read-only home: say so, and the engine stays eager
        raise NativeBuildError(f"cannot write the compiled kernel to {target.parent}: {e}") from e
    os.close(fd)
    cmd = [cc, *cflags, "-o", tmp, str(source), "-lm"]
    log.info("compiling the native decode kernel: %s", " ".join(cmd))
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        done = subprocess.CompletedProcess(cmd, 1, "", str(e))
    if done.returncode != 0:
        os.unlink(tmp)
        raise NativeBuildError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    os.replace(tmp, target)


def build() -> ctypes.CDLL:
    """The compiled library (compiled once per source, compiler, flags and CPU, then loaded
    from the cache). Raises NativeBuildError."""
    global _lib
    with _lock:
        if _lib is not None:
            return _lib
        target = library_path()
        if not target.exists():
            if compiler() is not None:
                compile_library(target)
            else:
                target = prebuilt_for(cpu_flags())
                if target is None:
                    raise NativeBuildError(
                        "no C compiler found (set CC, or install gcc) and no prebuilt kernel "
                        f"for this CPU in {PREBUILT_DIR}"
                    )
                log.info("no C compiler: loading the prebuilt native kernel %s", target.name)
        _lib = load_library(target)
        return _lib


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel and declare its functions. Raises NativeBuildError."""
    try:
        # torch is imported (and with it its libgomp): the library's libgomp.so.1 resolves to
        # that same runtime, so its threads are torch's.
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from e
    lib.mara_scratch_floats.restype = ctypes.c_long
    lib.mara_scratch_floats.argtypes = [ctypes.POINTER(_Decoder), ctypes.c_long, ctypes.c_long]
    lib.mara_decode.restype = None
    lib.mara_decode.argtypes = [ctypes.POINTER(_Decoder), ctypes.c_long, *[ctypes.c_void_p] * 6]
    lib.mara_head.restype = None
    lib.mara_head.argtypes = [ctypes.POINTER(_Decoder), ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                              ctypes.c_void_p]  # fmt: skip
    return lib


def prebuild(directory: Path | None = None) -> list[Path]:
    """Compile every portable build into `directory` (default PREBUILT_DIR; the container
    image runs this where it has a compiler, so that its runtime needs none)."""
    directory = directory or PREBUILT_DIR
    made = []
    builds = PORTABLE_BUILDS if _X86 else {"generic": ((), frozenset())}
    for name, (march, _) in builds.items():
        target = directory / f"decode_cpu-{name}.so"
        compile_library(target, (*BASE_CFLAGS, *march))
        made.append(target)
    return made


def prebuilt_for(cpu_flags: set[str], directory: Path | None = None) -> Path | None:
    """The best prebuilt library a CPU with `cpu_flags` runs (None: none there)."""
    directory = directory or PREBUILT_DIR
    for name, (_, needs) in PORTABLE_BUILDS.items():
        path = directory / f"decode_cpu-{name}.so"
        if needs <= cpu_flags and path.exists():
            return path
    generic = directory / "decode_cpu-generic.so"
    return generic if generic.exists() else None


def unsupported_reason(runner) -> str | None:
    """Why `runner` cannot use the native path (None: it can)."""
    if runner.device.type != "cpu":
        return "not on a CPU"
    if runner.dtype not in (torch.float32, torch.bfloat16):
        return f"dtype {runner.dtype} (native decoding runs float32 and bfloat16)"
    if runner.lm.quantization != "none":
        return f"--quantization {runner.lm.quantization}"
    layer = runner.lm.weights.layers[0]
    if layer.q_norm is not None:
        return "per-head q/k norms (qwen3)"
    if not _is_silu(layer.act):
        return f"activation {type(layer.act).__name__}"
    if runner.head_dim > 512 or runner.head_dim % 2:
        return f"head_dim {runner.head_dim}"
    return None


def _is_silu(act: nn.Module) -> bool:
    """The MLP activation is SiLU (every supported model type's; anything else stays eager)."""
    # by name: transformers' SiLUActivation (importing transformers.activations here would
    # probe optional packages at import time)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _ptr(t: torch.Tensor | None) -> int | None:
    if t is None:
        return None
    if not t.is_contiguous():
        raise ValueError("native decoding needs contiguous weights")
    return t.data_ptr()


class NativeDecoder:
    """Decode forwards of N tokens and the LM head on N states of `runner`'s model, in C, over
    its weights and KV cache. Raises NativeBuildError (no library) or ValueError (a model it
    does not support)."""

    def __init__(self, runner):
        reason = unsupported_reason(runner)
        if reason is not None:
            raise ValueError(f"native decoding does not support this model: {reason}")
        self.lib = build()
        w = runner.lm.weights  # the dense weights (the runner may hold split views of them)
        n = len(w.layers)

        def ptrs(tensors):
            return (ctypes.c_void_p * n)(*[_ptr(t) for t in tensors])

        L = w.layers
        self._arrays = [  # kept alive: the struct points into them
            ptrs([x.ln1_w for x in L]), ptrs([x.ln2_w for x in L]),
            (ctypes.c_float * n)(*[x.ln1_eps for x in L]),
            (ctypes.c_float * n)(*[x.ln2_eps for x in L]),
            ptrs([x.qkv_w for x in L]), ptrs([x.qkv_b for x in L]),
            ptrs([x.o_w for x in L]), ptrs([x.o_b for x in L]),
            ptrs([x.gate_up_w for x in L]), ptrs([x.gate_up_b for x in L]),
            ptrs([x.down_w for x in L]), ptrs([x.down_b for x in L]),
        ]  # fmt: skip
        cache = runner.cache
        self._tables = (runner.cos.contiguous(), runner.sin.contiguous())
        self.hidden = w.norm_w.shape[0]
        self.dtype = runner.dtype
        self.head_w = w.head_w
        self.head_b = getattr(w.lm_head, "bias", None)
        self.struct = _Decoder(
            n, self.hidden, runner.num_heads, runner.num_kv_heads, runner.head_dim,
            L[0].down_w.shape[1], int(runner.dtype == torch.bfloat16), torch.get_num_threads(),
            runner.scale, cache.num_slots, cache.capacity,
            *self._arrays, _ptr(w.norm_w), w.norm_eps, _ptr(w.embed.weight),
            _ptr(cache.keys), _ptr(cache.values), _ptr(self._tables[0]), _ptr(self._tables[1]),
        )  # fmt: skip
        self._ref = ctypes.byref(self.struct)
        self._scratch = torch.empty(0)
        self.calls = 0  # forwards run natively (tests assert the path ran)

    def _scratch_for(self, floats: int) -> int:
        if self._scratch.numel() < floats:
            self._scratch = torch.empty(max(floats, 2 * self._scratch.numel()))
        return self._scratch.data_ptr()

    def decode(self, tokens: list[int], slots: list[int], lengths: list[int],
               stores: list[int]) -> torch.Tensor:  # fmt: skip
        """Final hidden states (N, H) of N tokens: token i sits at position lengths[i] of
        slot slots[i], its K/V are written at cache position stores[i] (>= lengths[i]) and it
        sees [0, lengths[i]) and itself (candidates of one row share its slot)."""
        n = len(tokens)
        self.struct.n_threads = torch.get_num_threads()
        ints = torch.tensor([tokens, slots, lengths, stores], dtype=torch.long)
        scratch = self._scratch_for(self.lib.mara_scratch_floats(self._ref, n, max(lengths) + 1))
        out = torch.empty(n, self.hidden, dtype=self.dtype)
        p, step = ints.data_ptr(), n * ints.element_size()
        self.lib.mara_decode(self._ref, n, p, p + step, p + 2 * step, p + 3 * step,
                             out.data_ptr(), scratch)  # fmt: skip
        self.calls += 1
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head on states (M, H) → float32 logits (M, V), rounded as the eager head
        (model dtype, then float32)."""
        n, rows = hidden.shape[0], self.head_w.shape[0]
        x = hidden.contiguous()
        y = torch.empty(n, rows, dtype=self.dtype)
        scratch = self._scratch_for(n * (2 * self.hidden + rows))
        self.lib.mara_head(self._ref, self.head_w.data_ptr(), x.data_ptr(), y.data_ptr(), n,
                           rows, self.hidden, scratch)  # fmt: skip
        if self.head_b is not None:
            y = y + self.head_b
        return y.float()
