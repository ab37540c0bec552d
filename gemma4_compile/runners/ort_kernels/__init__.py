"""onnxruntime CPU kernels of our own: a custom-op library built from this folder's C++ on first use.

`gemma4_ort::SlidingWindowAttention` (attention.cc) is the export's attention op in one fp32 node: the runner's
rewrite swaps it for every layer's call of the function body (ops/attention/body.py `kernel_nodes`), whose ~20
nodes per layer were a third of an int4 decode step (issue #18; benchmarks/RESULTS.md, ninth session).
`gemma4_ort::MoEStep` (moe_step.cc; the domain is ops/moe/body.py `KERNEL_DOMAIN`) runs the routed experts of
an MoE call of a few tokens reading each picked expert's rows in place, where the function body gathers the K
experts' weights into a copy first (issue #18; benchmarks/RESULTS.md, sixth session). The onnxruntime runner
swaps it into the body's few-token branch (ops/moe/body.py `step_kernel`: calls of up to 16 tokens) when the
library is available, and keeps the body otherwise.

Building needs a C++17 compiler and onnxruntime's C/C++ API headers, which its Python wheel does not ship. They
come from `ORT_INCLUDE_DIR`, or from Debian's `libonnxruntime-dev` package (1.21, the API version the library
asks for; newer runtimes serve older API versions), fetched only by `build(fetch=True)`:

    python -m gemma4_compile.runners.ort_kernels      # fetch the headers if needed, build, print the path

The library is cached under `$GEMMA4_COMPILE_CACHE` (default `~/.cache/gemma4-compile`), keyed by its source,
the compiler, the headers and this CPU's flags (it is built with -march=native); builds of other sources stay (a
few tens of KB each), since another installed version may be using one. A runner never fetches: it uses
a cached library, or builds one from headers already on disk, or runs without (`KernelsUnavailable` says why).
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from pathlib import Path

__all__ = ["KernelsUnavailable", "build", "library"]

HERE = Path(__file__).parent
SOURCES = sorted(HERE.glob("*.cc"))  # compiled together; with kernels.h, the cache key
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC"]
# Debian trixie's onnxruntime dev package: headers only (the library it depends on is not needed)
HEADERS_DEB = (
    "http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
    "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08",
)
HEADERS_DIR = "ort-headers-1.21.0"
NEEDED = ("onnxruntime_cxx_api.h", "onnxruntime_lite_custom_op.h", "onnxruntime_c_api.h")


class KernelsUnavailable(RuntimeError):
    """The kernel library cannot be built or loaded here; the message says why."""


def cache_dir() -> Path:
    root = os.environ.get("GEMMA4_COMPILE_CACHE") or Path.home() / ".cache" / "gemma4-compile"
    return Path(root) / "ort-kernels"


def headers(fetch: bool = False) -> Path:
    """The folder holding onnxruntime's API headers: `ORT_INCLUDE_DIR`, the cached copy, or (`fetch`) a fresh
    one from Debian's package."""
    given = os.environ.get("ORT_INCLUDE_DIR")
    if given:
        if not all((Path(given) / n).is_file() for n in NEEDED):
            raise KernelsUnavailable(f"ORT_INCLUDE_DIR={given} lacks {', '.join(NEEDED)}")
        return Path(given)
    cached = cache_dir() / HEADERS_DIR
    if all((cached / n).is_file() for n in NEEDED):
        return cached
    if not fetch:
        raise KernelsUnavailable(
            "onnxruntime's C++ headers are not here: run `python -m gemma4_compile.runners.ort_kernels` "
            "or set ORT_INCLUDE_DIR"
        )
    return _fetch_headers(cached)


def _fetch_headers(dest: Path) -> Path:
    url, sha256 = HEADERS_DEB
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            deb = response.read()
    except OSError as e:
        raise KernelsUnavailable(f"cannot fetch onnxruntime headers from {url}: {e}") from None
    if hashlib.sha256(deb).hexdigest() != sha256:
        raise KernelsUnavailable(f"{url} does not have the expected sha256")
    tmp = Path(tempfile.mkdtemp(dir=_made(dest.parent)))
    with tarfile.open(fileobj=io.BytesIO(_ar_member(deb, b"data.tar")), mode="r:*") as tar:
        for member in tar.getmembers():
            if member.isfile() and "/include/onnxruntime/" in member.name and member.name.endswith(".h"):
                (tmp / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    if not all((tmp / n).is_file() for n in NEEDED):
        shutil.rmtree(tmp)
        raise KernelsUnavailable(f"{url} has no {', '.join(NEEDED)}")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)  # complete or absent
    return dest


def _ar_member(archive: bytes, prefix: bytes) -> bytes:
    """The first member of a Unix `ar` archive (a .deb) whose name starts with `prefix`."""
    if not archive.startswith(b"!<arch>\n"):
        raise KernelsUnavailable("the headers package is not an ar archive")
    at = 8
    while at + 60 <= len(archive):
        name, size = archive[at : at + 16].strip(), int(archive[at + 48 : at + 58])
        if name.startswith(prefix):
            return archive[at + 60 : at + 60 + size]
        at += 60 + size + (size & 1)
    raise KernelsUnavailable(f"the headers package has no {prefix.decode()} member")


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise KernelsUnavailable("no C++ compiler (set CXX or install g++)")
    return cxx


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def build(fetch: bool = False, extra_flags: tuple[str, ...] = ()) -> Path:
    """The built library (from the cache when its key matches), compiled now if needed; `extra_flags` go to the
    compiler too (tests build `-DGEMMA4_PORTABLE`, the code without AVX-512)."""
    try:
        return _build(headers(fetch), _compiler(), [*FLAGS, *extra_flags])
    except OSError as e:  # a compiler that does not run, an unwritable cache
        raise KernelsUnavailable(f"cannot build the kernels: {e}") from None


def _build(include: Path, cxx: str, flags: list[str]) -> Path:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256()
    sources = [p.read_bytes() for p in (*SOURCES, HERE / "kernels.h")]
    for part in (*sources, " ".join(flags).encode(), str(version).encode(), _cpu_flags().encode()):
        key.update(part)
    for name in NEEDED:
        key.update((include / name).read_bytes())
    target = cache_dir() / f"libgemma4_ort-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    tmp = Path(tempfile.mkdtemp(dir=_made(cache_dir()))) / target.name
    done = subprocess.run(
        [cxx, *flags, f"-I{include}", *map(str, SOURCES), "-o", str(tmp)], capture_output=True, text=True
    )
    if done.returncode:
        shutil.rmtree(tmp.parent, ignore_errors=True)
        reason = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise KernelsUnavailable(f"building the kernels failed: {reason}")
    tmp.rename(target)
    shutil.rmtree(tmp.parent, ignore_errors=True)
    return target


@functools.cache
def library() -> Path:
    """The library for runners: cached or built from headers on disk, never fetched (KernelsUnavailable)."""
    return build(fetch=False)
