"""Our C++ CPU kernels for the engine's CPU path, and their build.

- stream_gemm: y = (x @ W^T) * scale + bias + residual on fp32, bf16, fp16 or int8 weights in a column-blocked
  layout, streamed at the DRAM read rate at decode batches; int8 either weight-only or w8a8 (integer
  dot products on the activations' int8 codes).
- paged_attention: one query per sequence over its paged K/V cache, read in place (no gather); and
  the K/V write into the cache.
- decode_block: a GPT-2 model's decode step through all its blocks (the above, in one parallel call).
- team: the kernels' thread pool (parallel(), Team::for_each, barriers).

Build: the .cpp files beside this module are compiled on first use with the system's C++ compiler
($CXX, default g++), `-O3 -march=native -pthread`, into one shared library, so the binary targets the
CPU it runs on (vector width and register tiles follow its ISA). The library is kept in `build_dir`
under a name that hashes the sources, the compiler's version and the ISA macros -march=native defines
here: a changed source, compiler or CPU builds afresh, and a later process reuses the build. The
kernels' threads are a pool of their own (team.h says why not OpenMP's), sized per call by
torch.get_num_threads().
"""
from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from gpt2_engine.kernels.cpu import decode_block

SOURCES = tuple(sorted(Path(__file__).parent.glob("*.cpp")))
HEADERS = tuple(sorted(Path(__file__).parent.glob("*.h")))
FLAGS = ("-O3", "-march=native", "-pthread", "-std=c++17", "-shared", "-fPIC")


class BuildError(RuntimeError):
    """The C++ compiler is missing or failed: the CPU kernels are unavailable on this machine."""


def _compiler_output(compiler: str, *args: str, stdin: str = "") -> str:
    try:
        done = subprocess.run([compiler, *args], input=stdin, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuildError(f"C++ compiler {compiler!r} could not run: {err}") from None
    if done.returncode:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise BuildError(f"{compiler} {' '.join(args[-3:])} failed (exit {done.returncode}): {tail}")
    return done.stdout


def _writable_directory(build_dir: Path | None) -> Path:
    """build_dir, created if need be; a fresh temporary directory when it is None or cannot be written
    (a read-only home: the build then lasts for this process only)."""
    if build_dir is not None:
        try:
            Path(build_dir).mkdir(parents=True, exist_ok=True)
            if os.access(build_dir, os.W_OK):
                return Path(build_dir)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="gpt2-engine-kernels-"))


@functools.cache
def library(build_dir: Path | None = None, isa_flags: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The compiled kernels, built into build_dir (None or unwritable: a temporary directory) unless
    already there. isa_flags narrow -march=native (e.g. ("-mno-avx512f",) builds the AVX2 variant on
    an AVX-512 CPU): the tests run every variant the CPU can execute; the engine uses the native one."""
    compiler = os.environ.get("CXX", "g++")
    flags = (*FLAGS, *isa_flags)
    isa_macros = _compiler_output(compiler, "-march=native", *isa_flags, "-dM", "-E", "-x", "c++", "-")
    version = _compiler_output(compiler, "--version").splitlines()[0]
    sources = "\0".join(f"{path.name}\0{path.read_text()}" for path in SOURCES + HEADERS)
    key = hashlib.sha256("\0".join([sources, version, " ".join(flags), isa_macros]).encode()).hexdigest()
    directory = _writable_directory(build_dir)
    target = directory / f"gpt2_engine_cpu_kernels-{key[:16]}.so"
    if not target.exists():
        # each source compiled in parallel, linked beside the target, then renamed into place: a
        # concurrent process never loads a half-written library
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            objects = [str(Path(scratch) / f"{path.stem}.o") for path in SOURCES]
            with concurrent.futures.ThreadPoolExecutor(len(SOURCES)) as pool:
                list(pool.map(lambda src, obj: _compiler_output(compiler, *flags, "-c", str(src), "-o", obj),
                              SOURCES, objects))
            partial = str(Path(scratch) / target.name)
            _compiler_output(compiler, *flags, *objects, "-o", partial)
            os.replace(partial, target)
    lib = ctypes.CDLL(str(target))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.stream_gemm.argtypes = [ptr, i64, i64, ptr, i32, i64, ptr, ptr, ptr, ctypes.c_float, ptr, i32, ptr, ptr, i32]
    lib.paged_decode_attention_f32.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, ptr, i64, ptr, i64,
                                               ctypes.c_float, ptr, i64, i32]
    lib.paged_write_kv_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64]
    lib.paged_decode_attention_f32.restype = lib.paged_write_kv_f32.restype = i64
    lib.stream_gemm.restype = None
    lib.gpt2_decode_layers.argtypes = decode_block.argtypes()
    lib.gpt2_decode_layers.restype = i64
    lib.cpu_kernels_isa.restype = lib.stream_gemm_dot_isa.restype = lib.stream_gemm_bf16_isa.restype = ctypes.c_char_p
    lib.stream_gemm_set_prefetch.argtypes, lib.stream_gemm_set_prefetch.restype = [i32], None
    lib.stream_gemm_set_bf16_fused_rows.argtypes, lib.stream_gemm_set_bf16_fused_rows.restype = [i32], None
    lib.stream_read_sum.argtypes, lib.stream_read_sum.restype = [ptr, i64, i32], ctypes.c_float
    return lib
