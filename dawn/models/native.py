"""Native CPU kernels (dawn/models/kernels/*.cpp), compiled on first use with the machine's C++ compiler.

Two kernels, both for float32 inference on CPU, where PyTorch spends most of the time in small passes:
- `banded_attention`: the U-Net's local temporal attention (RoPE + scores + window mask + relative bias +
  softmax + values, per position and head, in cache). PyTorch has no CPU attention kernel that is fast for
  32-wide heads; this one runs the temporal attention ~2.5x faster than `scaled_dot_product_attention` on the
  same blocks.
- `cross_attention_coefficients`: the per-token coefficients of the blocks' condition cross-attention (query
  norms, sigmoid, the output norm's variance), one pass instead of ten.

The library is built once per machine type with `c++ -O3 -march=native -fopenmp` (seconds) into
$DAWN_KERNEL_CACHE (default ~/.cache/dawn/kernels), named by a hash of the sources, the compiler and the CPU's
feature flags, so a shared home directory across different CPUs never runs code built for another one. Without
a compiler, or with DAWN_NATIVE_KERNELS=0, the `*_supported` checks say no and callers use the PyTorch
formulation (same results within float32 rounding).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
SOURCES = (KERNELS / "banded_attention.cpp", KERNELS / "cross_attention.cpp")
HEADERS = (KERNELS / "vector_math.h",)
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
HEAD_DIMS = (16, 32, 64)
MAX_WINDOW = 54  # the kernel's tiles hold up to 7 vectors of 16 keys: 4 queries + 2 * window keys


def cache_dir() -> Path:
    return Path(os.environ.get("DAWN_KERNEL_CACHE", "~/.cache/dawn/kernels")).expanduser()


def enabled() -> bool:
    return os.environ.get("DAWN_NATIVE_KERNELS", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def build(sources: tuple[Path, ...] = SOURCES, name: str = "dawn_kernels") -> Path:
    """Compile `sources` into one shared library in the cache (if not there yet) and return its path. Raises
    RuntimeError with the compiler's message when it cannot be built."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    texts = [p.read_text() for p in (*sources, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, compiler, version, " ".join(FLAGS), _cpu_flags()]).encode()).hexdigest()
    target = cache_dir() / f"{name}-{key[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: concurrent builds race harmlessly
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, *map(str, sources), "-o", str(partial)], capture_output=True,
                                text=True)
        if result.returncode != 0:
            names = ", ".join(p.name for p in sources)
            raise RuntimeError(f"compiling {names} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (after one warning) where they cannot be built. Callers check `enabled()`
    first, so DAWN_NATIVE_KERNELS can be changed while a process runs."""
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as err:
        log.warning("native CPU kernels unavailable, using PyTorch's formulations: %s", err)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dawn_banded_attention.restype = ctypes.c_int
    lib.dawn_banded_attention.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ctypes.c_float,
                                          ptr, i64, i64, ctypes.c_int]
    lib.dawn_cross_attention_coefficients.restype = ctypes.c_int
    lib.dawn_cross_attention_coefficients.argtypes = [ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_float, ptr,
                                                      ctypes.c_int]
    return lib


def load() -> bool:
    """Build (first time on this machine type) and load the kernels now rather than at the first render step;
    False where they are unavailable (disabled, or no compiler: the warning says why)."""
    return enabled() and _library() is not None


def banded_attention_supported(qkv: torch.Tensor, dim_head: int, window: int | None) -> bool:
    """Whether `banded_attention` takes this call (else the caller uses PyTorch's attention)."""
    return (enabled() and window is not None and 0 <= window <= MAX_WINDOW and dim_head in HEAD_DIMS
            and qkv.device.type == "cpu" and qkv.dtype == torch.float32 and not qkv.requires_grad
            and _library() is not None)


def banded_attention(qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                     window: int) -> torch.Tensor:
    """Local attention of every position's frames, with RoPE, for inference.

    qkv (T, N, 3 * heads * dh): the q | k | v projections of N spatial positions over T frames (features
    contiguous). cos, sin (T, dh / 2): RoPE of frame t for the interleaved pair i. bias (heads, 2T - 1): the
    relative bias of offset j - i at index j - i + T - 1. Frame i attends to frames |j - i| <= window with
    scale 1/sqrt(dh). Returns (T, N, heads * dh). Call only where `banded_attention_supported`.
    """
    t, n, width = qkv.shape
    dh = width // (3 * heads)
    if qkv.stride(2) != 1:
        qkv = qkv.contiguous()
    cos, sin = (x.detach().to(torch.float32).contiguous() for x in (cos, sin))
    bias = bias.detach().to(torch.float32).contiguous()
    if cos.shape != (t, dh // 2) or sin.shape != cos.shape or bias.shape != (heads, 2 * t - 1):
        raise ValueError(f"banded_attention: cos/sin {tuple(cos.shape)} and bias {tuple(bias.shape)} do not match "
                         f"{t} frames, {heads} heads of {dh}")
    out = torch.empty(t, n, heads * dh, dtype=torch.float32)
    status = _library().dawn_banded_attention(
        qkv.data_ptr(), t, n, heads, dh, qkv.stride(0), qkv.stride(1), cos.data_ptr(), sin.data_ptr(),
        bias.data_ptr(), window, dh**-0.5, out.data_ptr(), out.stride(0), out.stride(1), torch.get_num_threads())
    if status != 0:
        raise ValueError(f"banded_attention: head dim {dh} / window {window} not supported by the kernel")
    return out


def cross_attention_supported(q: torch.Tensor, heads: int, dim_head: int) -> bool:
    """Whether `cross_attention_coefficients` takes this call (8 heads of 8 features: the released models')."""
    return (enabled() and heads == 8 and dim_head == 8 and q.device.type == "cpu" and q.dtype == torch.float32
            and not q.requires_grad and _library() is not None)


def cross_attention_coefficients(q: torch.Tensor, logits: torch.Tensor, gram: torch.Tensor, eps: float) -> torch.Tensor:
    """The condition cross-attention's per-token coefficients (see unet3d.CrossAttentionTerms).

    q (F, N, 3 * heads * dh): the N tokens' queries of F frames; logits (F, N, 3 * heads): <q_ah, w_ah>; gram
    (F, 3, heads + 1, heads + 1). Returns coef (F, N, 3 * (heads + 1)): for attention a, c_a = (1, s_a1..s_aH)
    with s_ah = sigmoid(logit_ah / max(|q_ah|, 1e-12)), divided by sqrt(max(c_a' G_a c_a, 0) + eps). Call only
    where `cross_attention_supported`.
    """
    frames, tokens, _ = q.shape
    heads = logits.shape[-1] // 3
    dh = q.shape[-1] // (3 * heads)
    q, logits, gram = (x.detach().to(torch.float32).contiguous() for x in (q, logits, gram))
    if logits.shape != (frames, tokens, 3 * heads) or gram.shape != (frames, 3, heads + 1, heads + 1):
        raise ValueError(f"cross_attention_coefficients: logits {tuple(logits.shape)} / gram {tuple(gram.shape)} "
                         f"do not match q {tuple(q.shape)}")
    coef = torch.empty(frames, tokens, 3 * (heads + 1), dtype=torch.float32)
    status = _library().dawn_cross_attention_coefficients(
        q.data_ptr(), logits.data_ptr(), gram.data_ptr(), frames, tokens, heads, dh, eps, coef.data_ptr(),
        torch.get_num_threads())
    if status != 0:
        raise ValueError(f"cross_attention_coefficients: {heads} heads of {dh} not supported by the kernel")
    return coef
