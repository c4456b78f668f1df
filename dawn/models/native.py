"""Native CPU kernels (dawn/models/kernels/*.cpp), compiled on first use with the machine's C++ compiler.

One kernel today: `banded_attention`, the U-Net's local temporal attention for float32 inference on CPU
(RoPE + scores + window mask + relative bias + softmax + values, per position and head, in cache). PyTorch has
no CPU attention kernel that is fast for 32-wide heads; this one runs the temporal attention ~3x faster than
`scaled_dot_product_attention` on the same blocks (bench/RESULTS.md).

The library is built once per machine type with `c++ -O3 -march=native -fopenmp` (~2 s) into
$DAWN_KERNEL_CACHE (default ~/.cache/dawn/kernels), named by a hash of the source, the compiler and the CPU's
feature flags, so a shared home directory across different CPUs never runs code built for another one. Without
a compiler, or with DAWN_NATIVE_KERNELS=0, `banded_attention` returns None and callers use the PyTorch
formulation (same result within float32 rounding).
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

SOURCE = Path(__file__).with_name("kernels") / "banded_attention.cpp"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
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


def build(source: Path = SOURCE) -> Path:
    """Compile `source` into the cache (if not there yet) and return the shared library's path. Raises
    RuntimeError with the compiler's message when it cannot be built."""
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([source.read_text(), compiler, version, " ".join(FLAGS), _cpu_flags()])
                         .encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # atomic: concurrent builds race harmlessly
        partial = Path(tmp) / target.name
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", str(partial)], capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr[-2000:]}")
        os.replace(partial, target)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as err:
        log.warning("native temporal attention unavailable, using PyTorch's: %s", err)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.dawn_banded_attention.restype = ctypes.c_int
    lib.dawn_banded_attention.argtypes = [ptr, i64, i64, i64, i64, i64, i64, ptr, ptr, ptr, i64, ctypes.c_float,
                                          ptr, i64, i64, ctypes.c_int]
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
