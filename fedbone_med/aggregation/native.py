"""An optional compiled kernel for the order-independent Gram entries (float32 slots).

Why: the server's latency after the last site gradient of a step arrives is one Gram row (K
dot products over P parameters) plus the final combination. In eager PyTorch the Gram row
costs about four reads of the slots, because float32 must be widened to float64 through
temporaries. This kernel reads each float32 value once and widens it in registers.

What it computes is *bit-identical* to :func:`~.projection.gram_entries`' PyTorch path,
which stays the reference and the fallback: lane l accumulates ``(double) x[t] * (double)
v[t]`` for t = l, l + L, l + 2L, ... in increasing t (the product of two float32 values is
exact in float64, so a fused multiply-add rounds the same as multiply-then-add), then the L
lanes are summed by pairwise halving, in the same order as the PyTorch path. No fast-math,
no reassociation; each row is computed by one thread, so the thread count changes nothing.
``tests/test_aggregation.py`` checks the bits against the PyTorch path.

How: on first use the C source below is compiled with the system C compiler (``cc``, or
``$CC``) into ``$FEDBONE_NATIVE_CACHE`` (default ``~/.cache/fedbone-med``, created 0700),
under a name that hashes the source and flags, written to a temporary file and renamed
into place (concurrent processes never load a half-written library), and loaded with
ctypes -- only if neither the file nor its directory is writable by others or owned by
another user (loading a library runs its code). Portable flags only (``-O3``, no
``-march=native``; on x86-64 with GCC an AVX2 clone is picked at load time where the CPU
has it), so a cache shared between machines of one architecture stays valid. No compiler,
a failed build, another architecture or ``FEDBONE_NATIVE=0``: the PyTorch path runs, with
the same results; the reason is kept in :func:`status`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

C_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
/* an AVX2 version chosen at load time on CPUs that have it, the baseline otherwise (same bits) */
__attribute__((target_clones("avx2", "default")))
#endif
/* out = sum over L lanes (pairwise halving) of lane sums; lane l accumulates
   (double) x[t] * (double) v[t] for t = l, l + L, ... in increasing t. acc: L doubles. */
double fb_gram_dot_f32(const float *x, const float *v, int64_t p, int64_t lanes, double *acc) {
    for (int64_t l = 0; l < lanes; ++l) acc[l] = 0.0;
    for (int64_t start = 0; start < p; start += lanes) {
        int64_t w = p - start < lanes ? p - start : lanes;
        const float *xs = x + start;
        const float *vs = v + start;
        for (int64_t l = 0; l < w; ++l) acc[l] += (double) xs[l] * (double) vs[l];
    }
    for (int64_t width = lanes; width > 1; width /= 2) {
        int64_t half = width / 2;
        for (int64_t l = 0; l < half; ++l) acc[l] += acc[l + half];
    }
    return acc[0];
}

/* out[t] = c[0] * g[0][t], then out[t] = fma(g[j][t], c[j], out[t]) for j = 1..k-1, for t in [lo, hi):
   float32, in column tiles that stay in L2 (one read of the k rows, one write of out). */
#define FB_COMBINE_BODY                                                                  \
    const int64_t tile = 16384;                                                          \
    for (int64_t s = lo; s < hi; s += tile) {                                            \
        const int64_t n = s + tile < hi ? tile : hi - s;                                 \
        float *restrict o = out + s;                                                     \
        const float *restrict x = g + s;                                                 \
        const float c0 = c[0];                                                           \
        for (int64_t i = 0; i < n; ++i) o[i] = x[i] * c0;                                \
        for (int64_t j = 1; j < k; ++j) {                                                \
            const float *restrict xj = g + j * stride + s;                               \
            const float cj = c[j];                                                       \
            for (int64_t i = 0; i < n; ++i) o[i] = fmaf(xj[i], cj, o[i]);                \
        }                                                                                \
    }

static void combine_base(const float *restrict g, int64_t stride, int64_t k, const float *restrict c, int64_t lo,
                         int64_t hi, float *restrict out) { FB_COMBINE_BODY }

#if defined(__x86_64__) && defined(__GNUC__)
/* the same source with AVX2 + FMA instructions (fmaf becomes vfmadd), used where the CPU has both */
__attribute__((target("avx2,fma")))
static void combine_fma(const float *restrict g, int64_t stride, int64_t k, const float *restrict c, int64_t lo,
                        int64_t hi, float *restrict out) { FB_COMBINE_BODY }
#endif

void fb_combine_f32(const float *g, int64_t stride, int64_t k, const float *c, int64_t lo, int64_t hi, float *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        combine_fma(g, stride, k, c, lo, hi, out);
        return;
    }
#endif
    combine_base(g, stride, k, c, lo, hi, out);
}
"""
# -ffp-contract=off: no fused multiply-add contraction (harmless in the Gram kernel, where products
# are exact, but it keeps the compiled arithmetic exactly what the source says: the combination's
# FMAs are the explicit fmaf calls); no -ffast-math; -fno-math-errno lets fmaf become one instruction.
CFLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-lm")
_SUPPORTED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_status = "not loaded yet"
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_key = (0, 0)  # (process id, workers): a forked child must not use its parent's (thread-less) pool


def status() -> str:
    """Whether the compiled kernel is in use, and if not, why (for logs and benchmarks)."""
    return _status


def _cache_dir() -> Path:
    root = os.environ.get("FEDBONE_NATIVE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "fedbone-med"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "gram.c"
        src.write_text(C_SOURCE)
        out = Path(tmp) / target.name
        run = subprocess.run([compiler, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            raise OSError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: another process sees the old name absent or the whole file


def _check_private(target: Path) -> None:
    """Refuse a library (or its directory) that another user could have written: loading runs its code."""
    for path in (target.parent, target):
        st = path.stat()
        if st.st_mode & 0o022 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise OSError(f"{path} is writable by others or owned by another user; not loading code from it")


def _load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None (with :func:`status` saying why) if unavailable."""
    global _lib, _status, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("FEDBONE_NATIVE", "1") == "0":
            _status = "disabled by FEDBONE_NATIVE=0"
            return None
        if platform.machine().lower() not in _SUPPORTED_MACHINES:
            _status = f"not built on {platform.machine()}"
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            _status = "no C compiler (cc) found: using the PyTorch path"
            return None
        tag = hashlib.sha256((C_SOURCE + "|".join(CFLAGS) + platform.machine()).encode()).hexdigest()[:16]
        target = _cache_dir() / f"fedbone_gram_{tag}.so"
        try:
            if not target.exists():
                _build(compiler, target)
            _check_private(target)
            lib = ctypes.CDLL(str(target))
            fn = lib.fb_gram_dot_f32
            fn.restype = ctypes.c_double
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
            comb = lib.fb_combine_f32
            comb.restype = None
            comb.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                             ctypes.c_int64, ctypes.c_void_p]
        except (OSError, subprocess.SubprocessError) as exc:
            _status = f"build or load failed ({exc}): using the PyTorch path"
            return None
        _lib = lib
        _status = f"compiled kernel in use ({target})"
        return lib


def reset() -> None:
    """Forget the loaded library and its status, so the next use decides again (tests, after changing env)."""
    global _lib, _status, _tried
    with _lock:
        _lib, _status, _tried = None, "not loaded yet", False


def available() -> bool:
    return _load() is not None


def _executor(workers: int) -> ThreadPoolExecutor:
    global _pool, _pool_key
    key = (os.getpid(), workers)
    with _lock:
        if _pool is None or _pool_key != key:
            if _pool is not None and _pool_key[0] == key[0]:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedbone-gram")
            _pool_key = key
        return _pool


def supports(grads: Tensor) -> bool:
    """True when the compiled kernel can compute ``gram_entries`` for these slots."""
    return (grads.dtype == torch.float32 and grads.device.type == "cpu" and grads.dim() == 2
            and grads.stride(1) == 1 and available())


def gram_entries_f32(grads: Tensor, lo: int, hi: int, row: int, lanes: int) -> Tensor:
    """G[i, row] for i in lo..hi-1, float64 (hi - lo,), exactly as the PyTorch path computes them.

    Rows are spread over ``torch.get_num_threads()`` threads (ctypes releases the GIL); each
    entry is computed by one thread alone, so the split does not change any bit.
    """
    lib = _load()
    assert lib is not None and supports(grads)
    fn = lib.fb_gram_dot_f32
    g = grads.detach()
    p = g.shape[1]
    item = g.element_size()
    base, stride = g.data_ptr(), g.stride(0) * item
    vec = base + row * stride
    rows = list(range(lo, hi))
    workers = max(1, min(torch.get_num_threads(), len(rows)))
    accs = torch.empty(workers, lanes, dtype=torch.float64)  # (workers, L) lane accumulators
    out = [0.0] * len(rows)

    def work(w: int) -> None:
        acc = accs[w].data_ptr()
        for n in range(w, len(rows), workers):
            out[n] = fn(base + rows[n] * stride, vec, p, lanes, acc)

    if workers == 1:
        work(0)
    else:
        list(_executor(workers).map(work, range(workers)))
    return torch.tensor(out, dtype=torch.float64)


def combine_f32(grads: Tensor, coeffs: list[float]) -> Tensor:
    """``sum_j coeffs[j] * grads[j]`` (P,) float32: out = c0 * g0, then one fused multiply-add per site.

    The same arithmetic as :func:`~.projection._combine`'s PyTorch path on CPUs where PyTorch's
    kernels use FMA (AVX2 and later), but one read of the rows instead of one per site and block.
    ``coeffs`` must already be float32 values. Column ranges are spread over
    ``torch.get_num_threads()`` threads; every element is computed by one thread in the same
    order, so the split changes no bit.
    """
    lib = _load()
    assert lib is not None and supports(grads)
    g = grads.detach()
    k, p = g.shape
    out = torch.empty(p, dtype=torch.float32)
    c = torch.tensor(coeffs, dtype=torch.float32)
    base, stride, dst, cp = g.data_ptr(), g.stride(0), out.data_ptr(), c.data_ptr()
    workers = max(1, min(torch.get_num_threads(), p // (1 << 16) + 1))
    bounds = [p * w // workers for w in range(workers + 1)]

    def work(w: int) -> None:
        lib.fb_combine_f32(base, stride, k, cp, bounds[w], bounds[w + 1], dst)

    if workers == 1:
        work(0)
    else:
        list(_executor(workers).map(work, range(workers)))
    return out
