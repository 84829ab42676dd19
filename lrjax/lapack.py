"""LAPACK's symmetric eigen-solvers on the host, for the CPU route of the closed form.

:func:`lrjax.decompose.decompose_net` on the CPU backend decomposes many layers at once on host
threads. XLA's ``eigh`` would need one compiled program per matrix size (about a third of a
first call's time on VGG-16), and SciPy's ``scipy.linalg.eigh`` holds the GIL while LAPACK runs,
so two host threads take as long as one. These call the same LAPACK routines (SciPy's own
build, through the function pointers that ``scipy.linalg.cython_lapack`` exports, as jaxlib does)
with ``ctypes``, which releases the GIL for the call: no compile, and the threads run in
parallel.

Both take a symmetric matrix as a C-contiguous NumPy array of float32 or float64 and overwrite
it; eigenvalues come back ascending, eigenvectors as columns. They read its lower triangle in
LAPACK's (column-major) terms: on two threads ``syevd`` then runs a quarter faster than on the
upper one (0.15 s against 0.20 s per 1536x1536 matrix here). :func:`eigvalsh` (eigenvalues
only) uses LAPACK's two-stage solver, ``?syevd_2stage``, which SciPy does not export: it is
looked up in the LAPACK that SciPy's extension links, and ``?syevd`` stands in where it is not
there.

:func:`small_pages` turns NumPy's transparent-huge-page advice off around the host work: where
the kernel compacts memory on that advice (THP ``defrag=madvise``, a common default), each
fresh array of hundreds of MB stalled (twelve 170 MB divisions: 21 s, 0.8 s without it).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import threading

import numpy as np
import scipy.linalg.cython_lapack

__all__ = ["eigh", "eigh_top", "eigvalsh", "cholesky_root", "small_pages"]

_INT = ctypes.POINTER(ctypes.c_int)
_PTR = ctypes.c_void_p
_REAL = {np.dtype(np.float32): ("s", ctypes.c_float), np.dtype(np.float64): ("d", ctypes.c_double)}


@functools.cache
def _routine(name: str, *argtypes):
    """The LAPACK routine ``name`` of SciPy's build as a ctypes function (Fortran ABI: every
    argument by pointer)."""
    capsule = scipy.linalg.cython_lapack.__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object,
                                                                  ctypes.c_char_p]
    return ctypes.CFUNCTYPE(None, *argtypes)(get_pointer(capsule, get_name(capsule)))


def _checked(a: np.ndarray) -> tuple[str, type, int]:
    a_dtype = np.dtype(a.dtype)
    if a_dtype not in _REAL or a.ndim != 2 or a.shape[0] != a.shape[1] \
            or not a.flags.c_contiguous or not a.flags.writeable:
        raise ValueError(f"need a writable C-contiguous square float32/float64 matrix; got "
                         f"shape {a.shape}, dtype {a.dtype}")
    prefix, real = _REAL[a_dtype]
    return prefix, real, a.shape[0]


def _int(value: int):
    return ctypes.byref(ctypes.c_int(value))


_SCRATCH = threading.local()  # each host thread's workspaces, reused from layer to layer


def _workspace(dtype, size: int) -> np.ndarray:
    """A workspace of at least ``size`` elements, this thread's own (fresh allocations of tens
    of MB cost page faults on every call on some hosts)."""
    cache = _SCRATCH.__dict__.setdefault("arrays", {})
    have = cache.get(np.dtype(dtype))
    if have is None or have.size < size:
        have = cache[np.dtype(dtype)] = np.empty(max(size, 1), dtype)
    return have


def _call(fn, name: str, dtype, args) -> None:
    """``fn(*args(work, lwork, iwork, liwork, info))`` after LAPACK's workspace query."""
    work, iwork, info = np.empty(1, dtype), np.empty(1, np.int32), ctypes.c_int(0)
    fn(*args(work, -1, iwork, -1, info))
    if info.value == 0:
        work, iwork = _workspace(dtype, int(work[0])), _workspace(np.int32, int(iwork[0]))
        fn(*args(work, work.size, iwork, iwork.size, info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK {name} failed with info={info.value}")


def eigh(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All eigenpairs of a symmetric ``(n, n)`` matrix (``?syevd``, divide and conquer),
    overwriting ``a``: ``(eigenvalues (n,) ascending, eigenvectors (n, n) as columns)``."""
    prefix, _, n = _checked(a)
    fn = _routine(f"{prefix}syevd", ctypes.c_char_p, ctypes.c_char_p, _INT, _PTR, _INT, _PTR,
                  _PTR, _INT, _PTR, _INT, ctypes.POINTER(ctypes.c_int))
    w = np.empty(n, a.dtype)
    _call(fn, f"{prefix}syevd", a.dtype, lambda work, lwork, iwork, liwork, info: (
        b"V", b"L", _int(n), a.ctypes.data, _int(n), w.ctypes.data, work.ctypes.data,
        _int(lwork), iwork.ctypes.data, _int(liwork), ctypes.byref(info)))
    return w, a.T  # column-major eigenvectors: the rows of the C-ordered buffer


def eigh_top(a: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest eigenpairs of a symmetric ``(n, n)`` matrix (``?syevr``, only those
    eigenvectors computed), overwriting ``a``: ``(eigenvalues (k,) ascending, eigenvectors
    (n, k) as columns)``."""
    prefix, real, n = _checked(a)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for a matrix of shape {a.shape}; got {k}")
    fn = _routine(f"{prefix}syevr", ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, _INT,
                  _PTR, _INT, ctypes.POINTER(real), ctypes.POINTER(real), _INT, _INT,
                  ctypes.POINTER(real), _INT, _PTR, _PTR, _INT, _PTR, _PTR, _INT, _PTR, _INT,
                  ctypes.POINTER(ctypes.c_int))
    w, z = np.empty(n, a.dtype), np.empty((k, n), a.dtype)  # z: (n, k) column-major
    support, found, bound = np.empty(2 * k, np.int32), ctypes.c_int(0), real(0.0)
    _call(fn, f"{prefix}syevr", a.dtype, lambda work, lwork, iwork, liwork, info: (
        b"V", b"I", b"L", _int(n), a.ctypes.data, _int(n), ctypes.byref(bound),
        ctypes.byref(bound), _int(n - k + 1), _int(n), ctypes.byref(bound), ctypes.byref(found),
        w.ctypes.data, z.ctypes.data, _int(n), support.ctypes.data, work.ctypes.data,
        _int(lwork), iwork.ctypes.data, _int(liwork), ctypes.byref(info)))
    if found.value != k:
        raise np.linalg.LinAlgError(f"LAPACK {prefix}syevr found {found.value} of {k} "
                                    "eigenpairs")
    return w[:k], z.T


# how LAPACK symbols are decorated in the library SciPy links (SciPy's wheels: scipy_ssyevd_);
# 32-bit integers only (an ILP64 build's symbols end in 64_, and are not tried)
_DECORATIONS = ("scipy_{}_", "{}_")


@functools.cache
def _two_stage(prefix: str):
    """``?syevd_2stage`` of the LAPACK that ``scipy.linalg.cython_lapack`` links (found through
    that extension's dependencies), or ``None``."""
    try:
        library = ctypes.CDLL(scipy.linalg.cython_lapack.__file__)
    except OSError:
        return None
    for decoration in _DECORATIONS:
        try:
            getattr(library, decoration.format(f"{prefix}syevd"))  # the same LAPACK's syevd
            fn = getattr(library, decoration.format(f"{prefix}syevd_2stage"))
        except AttributeError:
            continue
        fn.restype = None
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, _INT, _PTR, _INT, _PTR, _PTR, _INT,
                       _PTR, _INT, ctypes.POINTER(ctypes.c_int)]
        return fn
    return None


def eigvalsh(a: np.ndarray) -> np.ndarray:
    """The eigenvalues ``(n,)`` (ascending) of a symmetric ``(n, n)`` matrix, overwriting ``a``:
    LAPACK's two-stage reduction (``?syevd_2stage``, BLAS-3 band reduction: 1.6 s for a
    4096x4096 float32 matrix on one thread here, against 5.8 s for the one-stage ``?syevd``
    without vectors), or ``?syevd`` where the library lacks it."""
    prefix, _, n = _checked(a)
    fn, name = _two_stage(prefix), f"{prefix}syevd_2stage"
    if fn is None:
        fn = _routine(f"{prefix}syevd", ctypes.c_char_p, ctypes.c_char_p, _INT, _PTR, _INT,
                      _PTR, _PTR, _INT, _PTR, _INT, ctypes.POINTER(ctypes.c_int))
        name = f"{prefix}syevd"
    w = np.empty(n, a.dtype)
    _call(fn, name, a.dtype, lambda work, lwork, iwork, liwork, info: (
        b"N", b"L", _int(n), a.ctypes.data, _int(n), w.ctypes.data, work.ctypes.data,
        _int(lwork), iwork.ctypes.data, _int(liwork), ctypes.byref(info)))
    return w


def cholesky_root(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(R, R^{-1})`` with ``R`` upper triangular and ``R^T R = a`` for a symmetric positive
    definite ``(n, n)`` matrix (``?potrf`` then ``?trtri``), overwriting ``a``: a square root of
    ``a`` for a tenth to a quarter of an eigen-solve's time (float64, 3072x3072: 0.47 s against
    1.9 s for ``ssyevd`` with vectors here).

    Raises:
      numpy.linalg.LinAlgError: ``a`` is not numerically positive definite.
    """
    prefix, _, n = _checked(a)
    info = ctypes.c_int(0)
    # LAPACK's lower factor L (column-major) is the upper triangle of the C-ordered buffer: L^T
    _routine(f"{prefix}potrf", ctypes.c_char_p, _INT, _PTR, _INT, ctypes.POINTER(ctypes.c_int))(
        b"L", _int(n), a.ctypes.data, _int(n), ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK {prefix}potrf failed with info={info.value}: the "
                                    "matrix is not positive definite")
    root = np.triu(a)
    inverse = root.copy()  # L^{-1} in place, read back as (L^{-1})^T = R^{-1}
    _routine(f"{prefix}trtri", ctypes.c_char_p, ctypes.c_char_p, _INT, _PTR, _INT,
             ctypes.POINTER(ctypes.c_int))(b"L", b"N", _int(n), inverse.ctypes.data, _int(n),
                                           ctypes.byref(info))
    if info.value != 0:
        raise np.linalg.LinAlgError(f"LAPACK {prefix}trtri failed with info={info.value}")
    return root, inverse



_pages_lock = threading.Lock()
_pages = {"depth": 0, "advice": None}


def _hugepage_setter():
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    return getattr(getattr(core, "multiarray", None), "_set_madvise_hugepage", None)


@contextlib.contextmanager
def small_pages():
    """NumPy's transparent-huge-page advice (``madvise(MADV_HUGEPAGE)`` on large arrays) off
    while the block runs, restored when the outermost such block ends (reentrant, thread-safe;
    a no-op where NumPy has no such switch). Also a decorator: ``@small_pages()``."""
    setter = _hugepage_setter()
    if setter is None:
        yield
        return
    with _pages_lock:
        if _pages["depth"] == 0:
            _pages["advice"] = setter(False)
        _pages["depth"] += 1
    try:
        yield
    finally:
        with _pages_lock:
            _pages["depth"] -= 1
            if _pages["depth"] == 0:
                setter(_pages["advice"])
