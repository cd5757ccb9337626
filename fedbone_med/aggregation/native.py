"""An optional compiled kernel for the order-independent Gram entries (float32 slots).

Why: the server's latency after the last site gradient of a step arrives is one Gram row (K
dot products over P parameters) plus the final combination. In eager PyTorch the Gram row
costs about four reads of the slots, because float32 must be widened to float64 through
temporaries. This kernel reads each float32 value once and widens it in registers.

What it computes is *bit-identical* to :func:`~.projection.gram_entries`' PyTorch path,
which stays the reference and the fallback: in each column block of ``chunks * lanes``
columns, lane l accumulates ``(double) x[t] * (double) v[t]`` for t = the block's start + l,
+ lanes, ... in increasing t (the product of two float32 values is exact in float64, so a
fused multiply-add rounds the same as multiply-then-add), the lanes of a block are summed by
pairwise halving, then the blocks (padded with zeros to a power of two) by pairwise halving,
in the same order as the PyTorch path. No fast-math, no reassociation; a block sum is computed
by one thread from its two row segments alone, so neither the thread count nor which rows
share a call changes anything. ``tests/test_aggregation.py`` checks the bits against the
PyTorch path and against the summation tree written out in Python.

How: on first use the C source below is compiled with the system C compiler (``cc``, or
``$CC``) into ``$FEDBONE_NATIVE_CACHE`` (default ``~/.cache/fedbone-med``, created 0700),
under a name that hashes the source and flags, written to a temporary file and renamed
into place (concurrent processes never load a half-written library), and loaded with
ctypes -- only if neither the file nor its directory is writable by others or owned by
another user (loading a library runs its code). Portable flags only (``-O3``, no
``-march=native``; on x86-64 with GCC, AVX-512 or AVX2 + FMA versions of the loops are picked
at run time where the CPU has them), so a cache shared between machines of one architecture
stays valid. No compiler,
a failed build, another architecture or ``FEDBONE_NATIVE=0``: the PyTorch path runs, with
the same results; the reason is kept in :func:`status`. ``FEDBONE_NATIVE_ISA`` (base, avx2,
avx512) caps the instruction set; every level gives the same bits.

Threads: the library is built with ``-fopenmp`` where the compiler supports it. Its libgomp.so.1
is then, in a process that imported torch, torch's own OpenMP runtime, so the kernel runs on the
team torch's operators use. This matters on the latency path: the coordinator aggregates right
after the last site's backward pass, while torch's OpenMP threads still spin waiting for work; a
second set of threads (the thread pool used when OpenMP is unavailable) then competes with them for
the cores -- measured on a 2-core VM: 13.3 ms instead of 9.7 ms after the last slot arrives.
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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

C_SOURCE = r"""
#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* The Gram entries of gram_entries in projection.py, in two steps. (1) Block sums: the columns form
   blocks of chunks * lanes; in block b, lane l accumulates (double) x[t] * (double) v[t] for t = b's
   start + l, + lanes, ... in increasing t (from 0.0), and the block's lanes are summed by pairwise
   halving into sums[r * nbp + b]. A group kernel does one block for R <= 4 rows, which share each
   widened v value; their accumulators (R x lanes doubles, `acc`) stay in L1. (2) fb_gram_finish:
   per row, the block sums padded with 0.0 to nbp (a power of two) are summed by pairwise halving. */
#define FB_GRAM_GROUP(NAME, ATTR, R, MULADD)                                                          \
ATTR static void NAME(const float *const *x, const float *restrict v, int64_t s0, int64_t end,     \
                      int64_t lanes, double *restrict acc, double *restrict sums) {               \
    const float *restrict x0 = x[0];                                                               \
    const float *restrict x1 = x[R > 1 ? 1 : 0];                                                   \
    const float *restrict x2 = x[R > 2 ? 2 : 0];                                                   \
    const float *restrict x3 = x[R > 3 ? 3 : 0];                                                   \
    double *restrict a0 = acc, *restrict a1 = acc + lanes, *restrict a2 = acc + 2 * lanes;         \
    double *restrict a3 = acc + 3 * lanes;                                                         \
    for (int64_t l = 0; l < R * lanes; ++l) acc[l] = 0.0;                                          \
    for (int64_t s = s0; s < end; s += lanes) {                                                    \
        const int64_t w = end - s < lanes ? end - s : lanes;                                       \
        const float *restrict vs = v + s;                                                          \
        const float *restrict y0 = x0 + s, *restrict y1 = x1 + s;                                  \
        const float *restrict y2 = x2 + s, *restrict y3 = x3 + s;                                  \
        for (int64_t l = 0; l < w; ++l) {                                                          \
            const double vv = (double) vs[l];                                                      \
            a0[l] = MULADD((double) y0[l], vv, a0[l]);                                                          \
            if (R > 1) a1[l] = MULADD((double) y1[l], vv, a1[l]);                                               \
            if (R > 2) a2[l] = MULADD((double) y2[l], vv, a2[l]);                                               \
            if (R > 3) a3[l] = MULADD((double) y3[l], vv, a3[l]);                                               \
        }                                                                                          \
    }                                                                                              \
    for (int64_t r = 0; r < R; ++r) {                                                              \
        double *a = acc + r * lanes;                                                               \
        for (int64_t width = lanes; width > 1; width /= 2) {                                       \
            const int64_t half = width / 2;                                                        \
            for (int64_t l = 0; l < half; ++l) a[l] += a[l + half];                                \
        }                                                                                          \
        sums[r] = a[0];                                                                            \
    }                                                                                              \
}

/* a * b + c with the product rounded first (two operations): where there is no FMA instruction.
   The product of two float32 values is exact in float64, so fma(a, b, c) rounds the same way. */
#define FB_MUL_ADD(a, b, c) ((a) * (b) + (c))

#if defined(__x86_64__) && defined(__GNUC__)
#define FB_X86 1
#define FB_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx2,fma")))
#define FB_AVX2 __attribute__((target("avx2,fma")))
FB_GRAM_GROUP(gram4_avx512, FB_AVX512, 4, fma)
FB_GRAM_GROUP(gram2_avx512, FB_AVX512, 2, fma)
FB_GRAM_GROUP(gram1_avx512, FB_AVX512, 1, fma)
FB_GRAM_GROUP(gram4_avx2, FB_AVX2, 4, fma)
FB_GRAM_GROUP(gram2_avx2, FB_AVX2, 2, fma)
FB_GRAM_GROUP(gram1_avx2, FB_AVX2, 1, fma)
#endif
FB_GRAM_GROUP(gram4_base, , 4, FB_MUL_ADD)
FB_GRAM_GROUP(gram2_base, , 2, FB_MUL_ADD)
FB_GRAM_GROUP(gram1_base, , 1, FB_MUL_ADD)

typedef void (*fb_gram_fn)(const float *const *, const float *, int64_t, int64_t, int64_t, double *, double *);

/* Instruction set chosen once per call; every variant does the same IEEE operations in the same
   order (no contraction: -ffp-contract=off), so they give the same bits. */
static int fb_isa_cap = 2;  /* at most this level: FEDBONE_NATIVE_ISA (tests compare every level's bits) */

void fb_set_isa_cap(int cap) { fb_isa_cap = cap; }

static int fb_isa(void) {
#ifdef FB_X86
    if (fb_isa_cap >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma"))
        return 2;
    if (fb_isa_cap >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
    return 0;
}

typedef struct { fb_gram_fn f4, f2, f1; } fb_gram_fns;

static fb_gram_fns fb_gram_pick(void) {
    fb_gram_fns fn = {gram4_base, gram2_base, gram1_base};
#ifdef FB_X86
    const int isa = fb_isa();
    if (isa == 2) { fn.f4 = gram4_avx512; fn.f2 = gram2_avx512; fn.f1 = gram1_avx512; }
    else if (isa == 1) { fn.f4 = gram4_avx2; fn.f2 = gram2_avx2; fn.f1 = gram1_avx2; }
#endif
    return fn;
}

/* One block (columns [s0, end)) of n rows against v, four rows at a time: the sum of row t goes to
   dst[t * dst_stride]. Row t is g + rows[t] * stride, or g + (first + t) * stride when rows is NULL. */
static void fb_gram_block(const fb_gram_fns *fn, const float *g, int64_t stride, const int64_t *rows, int64_t first,
                          int64_t n, const float *v, int64_t s0, int64_t end, int64_t lanes, double *acc,
                          double *dst, int64_t dst_stride) {
    for (int64_t i = 0; i < n; ) {
        const float *x[4];
        const int64_t r = n - i >= 4 ? 4 : (n - i >= 2 ? 2 : 1);
        double out[4];
        for (int64_t t = 0; t < r; ++t) x[t] = g + (rows ? rows[i + t] : first + i + t) * stride;
        (r == 4 ? fn->f4 : r == 2 ? fn->f2 : fn->f1)(x, v, s0, end, lanes, acc, out);
        for (int64_t t = 0; t < r; ++t) dst[(i + t) * dst_stride] = out[t];
        i += r;
    }
}

/* Block sums of blocks [b_lo, b_hi) for rows rows[0..nrows-1] of g (row stride `stride` floats) against
   v: sums[i * nbp + b]. Blocks outer, groups of four rows inner, so a block of v is read from memory
   once; a block sum does not depend on its group or on which thread computes it. acc: 4 * lanes. */
void fb_gram_blocks_f32(const float *g, int64_t stride, const int64_t *rows, int64_t nrows, const float *v,
                        int64_t p, int64_t lanes, int64_t chunks, int64_t b_lo, int64_t b_hi, double *acc,
                        double *sums, int64_t nbp) {
    const fb_gram_fns fn = fb_gram_pick();
    const int64_t q = lanes * chunks;
    for (int64_t b = b_lo; b < b_hi; ++b) {
        const int64_t s0 = b * q, end = (b + 1) * q < p ? (b + 1) * q : p;
        fb_gram_block(&fn, g, stride, rows, 0, nrows, v, s0, end, lanes, acc, sums + b, nbp);
    }
}

/* Block sums of blocks [b_lo, b_hi) for every pair i <= j of the k rows of g: pair (i, j) is row i
   against v = row j (products commute, so it equals row j against row i), stored at
   sums[(j * (j + 1) / 2 + i) * nbp + b]. Blocks outer: a block of all k rows is read from memory once. */
void fb_gram_all_f32(const float *g, int64_t stride, int64_t k, int64_t p, int64_t lanes, int64_t chunks,
                     int64_t b_lo, int64_t b_hi, double *acc, double *sums, int64_t nbp) {
    const fb_gram_fns fn = fb_gram_pick();
    const int64_t q = lanes * chunks;
    for (int64_t b = b_lo; b < b_hi; ++b) {
        const int64_t s0 = b * q, end = (b + 1) * q < p ? (b + 1) * q : p;
        for (int64_t j = 0; j < k; ++j)
            fb_gram_block(&fn, g, stride, NULL, 0, j + 1, g + j * stride, s0, end, lanes, acc,
                          sums + (j * (j + 1) / 2) * nbp + b, nbp);
    }
}

/* out[i] = pairwise-halving sum of sums[i * nbp + 0..nbp-1], after setting the entries from nb on to 0.0. */
void fb_gram_finish(double *sums, int64_t nrows, int64_t nb, int64_t nbp, double *out) {
    for (int64_t i = 0; i < nrows; ++i) {
        double *bl = sums + i * nbp;
        for (int64_t b = nb; b < nbp; ++b) bl[b] = 0.0;
        for (int64_t width = nbp; width > 1; width /= 2) {
            const int64_t half = width / 2;
            for (int64_t j = 0; j < half; ++j) bl[j] += bl[j + half];
        }
        out[i] = bl[0];
    }
}

/* out[t] = c[0] * g[0][t], then out[t] = fma(g[j][t], c[j], out[t]) for j = 1..k-1, for t in [lo, hi):
   float32, one read of the k rows and one write of out. Column tiles that stay in L2. */
#define FB_COMBINE_TILED                                                                 \
    const int64_t tile = 16384;                                                           \
    for (int64_t s = lo; s < hi; s += tile) {                                            \
        const int64_t n = s + tile < hi ? tile : hi - s;                                 \
        float *restrict o = out + s;                                                     \
        const float *restrict x = g + s;                                                 \
        const float c0 = c[0];                                                           \
        for (int64_t i = 0; i < n; ++i) o[i] = x[i] * c0;                                \
        int64_t j = 1;                                                                   \
        for (; j + 4 <= k; j += 4) { /* four rows per pass over the tile, same order */  \
            const float *restrict xa = g + j * stride + s, *restrict xb = xa + stride;   \
            const float *restrict xc = xb + stride, *restrict xd = xc + stride;          \
            const float ca = c[j], cb = c[j + 1], cc = c[j + 2], cd = c[j + 3];          \
            for (int64_t i = 0; i < n; ++i)                                              \
                o[i] = fmaf(xd[i], cd, fmaf(xc[i], cc, fmaf(xb[i], cb, fmaf(xa[i], ca, o[i])))); \
        }                                                                                \
        for (; j < k; ++j) {                                                             \
            const float *restrict xj = g + j * stride + s;                               \
            const float cj = c[j];                                                       \
            for (int64_t i = 0; i < n; ++i) o[i] = fmaf(xj[i], cj, o[i]);                \
        }                                                                                \
    }

#define FB_COMBINE_ARGS const float *restrict g, int64_t stride, int64_t k, const float *restrict c, int64_t lo, \
                        int64_t hi, float *restrict out
static void combine_base(FB_COMBINE_ARGS) { FB_COMBINE_TILED }
#ifdef FB_X86
/* the same source with FMA instructions (fmaf becomes one vfmadd; without them it is a libm call) */
FB_AVX2 static void combine_fma(FB_COMBINE_ARGS) { FB_COMBINE_TILED }
#endif

void fb_combine_f32(const float *g, int64_t stride, int64_t k, const float *c, int64_t lo, int64_t hi, float *out) {
#ifdef FB_X86
    if (fb_isa() > 0) {  /* AVX2 + FMA (also on AVX-512 machines: this loop is memory-bound) */
        combine_fma(g, stride, k, c, lo, hi, out);
        return;
    }
#endif
    combine_base(g, stride, k, c, lo, hi, out);
}

/* The same work spread over an OpenMP team of `nthreads` (when built with -fopenmp): thread w of n takes
   blocks [nb * w / n, nb * (w + 1) / n) (columns, for the combination). Linked against libgomp.so.1,
   which in a process that imported torch is torch's own OpenMP runtime: the team is the one torch's
   operators use, whose threads are still spinning from the backward pass that just ended, instead of
   a second set of threads competing with them for the cores. Every block sum and every output element
   is computed by one thread in the same order, so the split changes no bit. */
#ifdef _OPENMP
#include <omp.h>
#define FB_TEAM_BEGIN _Pragma("omp parallel num_threads(nthreads)") { const int64_t w = omp_get_thread_num(), \
    n = omp_get_num_threads();
#else
#define FB_TEAM_BEGIN { const int64_t w = 0, n = 1; (void) nthreads;
#endif
#define FB_TEAM_END }

int fb_isa_level(void) { return fb_isa(); }

int fb_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

void fb_gram_blocks_team(const float *g, int64_t stride, const int64_t *rows, int64_t nrows, const float *v, int64_t p,
                         int64_t lanes, int64_t chunks, int64_t nb, double *sums, int64_t nbp, int nthreads) {
    FB_TEAM_BEGIN
        double acc[4 * lanes];
        fb_gram_blocks_f32(g, stride, rows, nrows, v, p, lanes, chunks, nb * w / n, nb * (w + 1) / n, acc, sums, nbp);
    FB_TEAM_END
}

void fb_gram_all_team(const float *g, int64_t stride, int64_t k, int64_t p, int64_t lanes, int64_t chunks, int64_t nb,
                      double *sums, int64_t nbp, int nthreads) {
    FB_TEAM_BEGIN
        double acc[4 * lanes];
        fb_gram_all_f32(g, stride, k, p, lanes, chunks, nb * w / n, nb * (w + 1) / n, acc, sums, nbp);
    FB_TEAM_END
}

void fb_combine_team(const float *g, int64_t stride, int64_t k, const float *c, int64_t p, float *out, int nthreads) {
    FB_TEAM_BEGIN
        fb_combine_f32(g, stride, k, c, p * w / n, p * (w + 1) / n, out);
    FB_TEAM_END
}
"""
# -ffp-contract=off: no fused multiply-add contraction (harmless in the Gram kernel, where products
# are exact, but it keeps the compiled arithmetic exactly what the source says: the combination's
# FMAs are the explicit fmaf calls); no -ffast-math; -fno-math-errno lets fmaf become one instruction.
CFLAGS = ("-O3", "-fPIC", "-shared", "-std=c99", "-ffp-contract=off", "-fno-fast-math", "-fno-math-errno", "-lm")
# Tried first: the same with OpenMP (the team entry points run on torch's OpenMP threads); a compiler
# without OpenMP support gets CFLAGS, and the work is spread over a Python thread pool instead.
CFLAGS_OPENMP = (*CFLAGS, "-fopenmp")
MAX_TEAM_LANES = 1024  # the team entry points keep 4 * lanes doubles per thread on its stack
# FEDBONE_NATIVE_ISA caps the instruction set the kernel picks (every level gives the same bits; the
# tests check that on a machine that has them all): unset or "avx512" = the best the CPU has.
ISA_LEVELS = ("base", "avx2", "avx512")
_SUPPORTED_MACHINES = ("x86_64", "amd64", "aarch64", "arm64")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_openmp = False  # the loaded library was built with OpenMP
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


def _build(compiler: str, target: Path, flags: tuple[str, ...]) -> None:
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "gram.c"
        src.write_text(C_SOURCE)
        out = Path(tmp) / target.name
        run = subprocess.run([compiler, *flags, "-o", str(out), str(src)], capture_output=True, text=True,
                             timeout=120)
        if run.returncode != 0:
            raise OSError(f"{compiler} failed: {run.stderr.strip()[-500:]}")
        os.replace(out, target)  # atomic: another process sees the old name absent or the whole file


def _library_path(flags: tuple[str, ...]) -> Path:
    """Where the library built from C_SOURCE with ``flags`` is cached (the name hashes both)."""
    tag = hashlib.sha256((C_SOURCE + "|".join(flags) + platform.machine()).encode()).hexdigest()[:16]
    return _cache_dir() / f"fedbone_gram_{tag}.so"


def _built_library(compiler: str) -> Path:
    """The cached library, built first if needed: with OpenMP, else (the compiler lacks it) without.
    A library built without OpenMP earlier is taken as it is (the compiler lacked OpenMP then)."""
    target, plain = _library_path(CFLAGS_OPENMP), _library_path(CFLAGS)
    if target.exists():
        return target
    if plain.exists():
        return plain
    try:
        _build(compiler, target, CFLAGS_OPENMP)
        return target
    except (OSError, subprocess.SubprocessError):
        _build(compiler, plain, CFLAGS)
        return plain


def _isa_cap() -> int | None:
    """The level FEDBONE_NATIVE_ISA allows (index into ISA_LEVELS); None for an unknown name."""
    name = os.environ.get("FEDBONE_NATIVE_ISA", "avx512").strip().lower() or "avx512"
    return ISA_LEVELS.index(name) if name in ISA_LEVELS else None


def _check_private(target: Path) -> None:
    """Refuse a library (or its directory) that another user could have written: loading runs its code."""
    for path in (target.parent, target):
        st = path.stat()
        if st.st_mode & 0o022 or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise OSError(f"{path} is writable by others or owned by another user; not loading code from it")


_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
# The C functions' signatures: name -> (return type, argument types).
_SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "fb_gram_blocks_f32": (None, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64]),
    "fb_gram_all_f32": (None, [_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64]),
    "fb_gram_finish": (None, [_PTR, _I64, _I64, _I64, _PTR]),
    "fb_combine_f32": (None, [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR]),
    "fb_gram_blocks_team": (None, [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _I64, _PTR, _I64, _INT]),
    "fb_gram_all_team": (None, [_PTR, _I64, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _INT]),
    "fb_combine_team": (None, [_PTR, _I64, _I64, _PTR, _I64, _PTR, _INT]),
    "fb_openmp": (_INT, []),
    "fb_set_isa_cap": (None, [_INT]),
    "fb_isa_level": (_INT, []),
}


def _declare(lib: ctypes.CDLL) -> None:
    """Give every C function its ctypes signature (a missing symbol raises AttributeError)."""
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def _load() -> ctypes.CDLL | None:
    """The compiled library, building it on first use; None (with :func:`status` saying why) if unavailable."""
    global _lib, _status, _tried, _openmp
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
        cap = _isa_cap()
        if cap is None:
            _status = (f"FEDBONE_NATIVE_ISA must be one of {list(ISA_LEVELS)}, got "
                       f"{os.environ.get('FEDBONE_NATIVE_ISA')!r}: using the PyTorch path")
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
        if not compiler:
            _status = "no C compiler (cc) found: using the PyTorch path"
            return None
        target = _library_path(CFLAGS_OPENMP)
        try:
            target = _built_library(compiler)
            _check_private(target)
            lib = ctypes.CDLL(str(target))
            _declare(lib)
            openmp = bool(lib.fb_openmp())
            lib.fb_set_isa_cap(cap)
            isa = ISA_LEVELS[lib.fb_isa_level()]
        except (OSError, AttributeError, subprocess.SubprocessError) as exc:
            _status = f"build or load failed ({exc}): using the PyTorch path"
            return None
        _lib, _openmp = lib, openmp
        threads = ("OpenMP team" if openmp
                   else "thread pool: the compiler did not build it with OpenMP; delete the file to retry")
        _status = f"compiled kernel in use ({target}; {isa}; {threads})"
        return lib


def reset() -> None:
    """Forget the loaded library and its status, so the next use decides again (tests, after changing env)."""
    global _lib, _status, _tried, _openmp
    with _lock:
        _lib, _status, _tried, _openmp = None, "not loaded yet", False, False


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


def _run(workers: int, work: Callable[[int], None]) -> None:
    """``work(w)`` for w in range(workers): inline for one, on the shared pool otherwise."""
    if workers == 1:
        work(0)
    else:
        list(_executor(workers).map(work, range(workers)))


def _block_sums(p: int, lanes: int, chunks: int, n: int,
                fill: Callable[[int, int, int, int, int], None],
                team: Callable[[int, int, int, int], None]) -> Tensor:
    """Entries (n,) float64 from per-block sums: the column blocks are split over
    ``torch.get_num_threads()`` threads, block b of entry i is written at ``sums[i * span + b]``, then
    every entry's blocks are summed pairwise (fb_gram_finish). With OpenMP, one call
    ``team(blocks, sums_ptr, span, threads)`` runs the split on torch's OpenMP team; otherwise
    ``fill(b_lo, b_hi, acc_ptr, sums_ptr, span)`` runs per block range on the thread pool. A block sum
    is a function of its two row segments alone, so neither the split nor the threads change a bit."""
    lib = _load()
    assert lib is not None
    blocks = -(-p // (lanes * chunks))
    span = 1
    while span < blocks:
        span *= 2
    workers = max(1, min(torch.get_num_threads(), blocks))
    sums = torch.empty(n, span, dtype=torch.float64)  # (n, B padded to 2^k) block sums
    out = torch.empty(n, dtype=torch.float64)
    if _openmp and lanes <= MAX_TEAM_LANES:
        team(blocks, sums.data_ptr(), span, workers)
    else:
        bounds = [blocks * w // workers for w in range(workers + 1)]
        accs = torch.empty(workers, 4 * lanes, dtype=torch.float64)  # (workers, 4 L) lane accumulators
        _run(workers, lambda w: fill(bounds[w], bounds[w + 1], accs[w].data_ptr(), sums.data_ptr(), span))
    lib.fb_gram_finish(sums.data_ptr(), n, blocks, span, out.data_ptr())
    return out


def gram_entries_f32(grads: Tensor, lo: int, hi: int, row: int, lanes: int, chunks: int) -> Tensor:
    """G[i, row] for i in lo..hi-1, float64 (hi - lo,), exactly as the PyTorch path computes them.

    The column blocks are spread over ``torch.get_num_threads()`` threads (ctypes releases the
    GIL); neither the split nor which rows share a call changes any bit.
    """
    lib = _load()
    assert lib is not None and supports(grads)
    g = grads.detach()
    p = g.shape[1]
    n = hi - lo
    rows = torch.arange(lo, hi, dtype=torch.int64)
    base, stride, vec = g.data_ptr(), g.stride(0), g[row].data_ptr()
    return _block_sums(p, lanes, chunks, n, lambda b_lo, b_hi, acc, sums, span: lib.fb_gram_blocks_f32(
        base, stride, rows.data_ptr(), n, vec, p, lanes, chunks, b_lo, b_hi, acc, sums, span),
        lambda nb, sums, span, threads: lib.fb_gram_blocks_team(
            base, stride, rows.data_ptr(), n, vec, p, lanes, chunks, nb, sums, span, threads))


def gram_all_f32(grads: Tensor, lanes: int, chunks: int) -> Tensor:
    """The whole Gram matrix (K, K) float64, every entry with the bits of :func:`gram_entries_f32`.

    One pass over the rows (column blocks outer, spread over threads), instead of one pass per row.
    """
    lib = _load()
    assert lib is not None and supports(grads)
    g = grads.detach()
    k, p = g.shape
    base, stride = g.data_ptr(), g.stride(0)
    flat = _block_sums(p, lanes, chunks, k * (k + 1) // 2, lambda b_lo, b_hi, acc, sums, span: lib.fb_gram_all_f32(
        base, stride, k, p, lanes, chunks, b_lo, b_hi, acc, sums, span),
        lambda nb, sums, span, threads: lib.fb_gram_all_team(
            base, stride, k, p, lanes, chunks, nb, sums, span, threads))
    jj, ii = torch.tril_indices(k, k)  # row-major lower triangle: pair j * (j + 1) / 2 + i for i <= j
    gram = torch.empty(k, k, dtype=torch.float64)
    gram[ii, jj] = flat
    gram[jj, ii] = flat
    return gram


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
    if _openmp:
        lib.fb_combine_team(base, stride, k, cp, p, dst, workers)
        return out
    bounds = [p * w // workers for w in range(workers + 1)]
    _run(workers, lambda w: lib.fb_combine_f32(base, stride, k, cp, bounds[w], bounds[w + 1], dst))
    return out
