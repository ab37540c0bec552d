"""Safe outputs, shared by every stage, and file hashing.

An output directory is built beside its final name and swapped in when complete, so a path holds either
the old output or the new one, never a half-written one (docs/outputs.md). Before any work:
`check_output_path` refuses a path whose replacement would destroy an input, the working directory, the
home directory or a filesystem root; `output_lock` lets one run at a time write an output; `--force`
replaces only a directory this project wrote (`is_project_output`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import Gemma4CompileError

# The manifests' formats, here so that this low-level module recognizes our outputs without importing a stage
EXPORT_FORMAT, EXPORT_MANIFEST = "gemma4-compile/export", "export.json"
ENGINE_FORMAT, ENGINE_MANIFEST = "gemma4-compile/engine", "manifest.json"
MARKER = ".gemma4-compile"  # {"kind": ...}: written into a checkpoint or compile output this project made
TMP, OLD, LOCK = "tmp", "old", "lock"  # sibling names: .NAME.tmp.*, .NAME.old.*, .NAME.lock


def _sibling(out: Path, role: str) -> str:
    return f".{out.name}.{role}"


# ----- which paths may be written --------------------------------------------------------------------


def check_output_path(
    out: Path, inputs: Iterable[Path] = (), error: type[Gemma4CompileError] = Gemma4CompileError
) -> None:
    """Refuse, in one line, an output whose replacement would delete an input or a directory nobody means to
    lose: the input itself, one containing it or inside it, the working directory, home or a root."""
    target = Path(out).expanduser().resolve()
    _check_is_directory_path(out, target, error)
    protected = {
        "a filesystem root": Path(target.anchor),
        "the home directory": Path.home().resolve(),
        "the working directory": Path.cwd().resolve(),
    }
    for what, path in protected.items():
        if target == path:
            raise error(f"output {out} is {what}; choose a directory of its own")
        if path.is_relative_to(target):
            raise error(f"output {out} contains {what}; choose a directory of its own")
    for given in inputs:
        source = Path(given).expanduser().resolve()
        if target == source:
            raise error(f"output {out} is the input {given}; choose another output directory")
        if source.is_relative_to(target):
            raise error(f"output {out} contains the input {given}; choose another output directory")
        if target.is_relative_to(source):
            raise error(f"output {out} is inside the input {given}; choose a directory outside it")


def _check_is_directory_path(out: Path, target: Path, error: type[Gemma4CompileError]) -> None:
    """An output is a directory: refuse a path that is a file, or lies under one."""
    for path in (target, *target.parents):
        if path.exists() and not path.is_dir():
            where = "is a file" if path == target else f"is inside {path}, which is a file"
            raise error(f"output {out} {where}; give a directory")
        if path.exists():
            return


def is_project_output(path: Path) -> bool:
    """True for a directory gemma4-compile wrote: an export (export.json in our format), a random checkpoint or
    a compile output (our marker file), a compile output from before the marker (reports/ beside an export),
    or one of a compile output's stage directories (checkpoint/, export/, reports/)."""
    return (
        _has_marker(path)
        or _is_export(path)
        or _is_engine(path)
        or _is_compile_output(path)
        or (path.name in COMPILE_STAGES and _is_compile_output(path.parent))
    )


COMPILE_STAGES = ("checkpoint", "export", "reports")


def _has_marker(path: Path) -> bool:
    return (path / MARKER).is_file()


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_export(path: Path) -> bool:
    return _read_json(path / EXPORT_MANIFEST).get("format") == EXPORT_FORMAT


def _is_engine(path: Path) -> bool:
    return _read_json(path / ENGINE_MANIFEST).get("format") == ENGINE_FORMAT


def _is_compile_output(path: Path) -> bool:
    if _has_marker(path):
        return _read_json(path / MARKER).get("kind") == "compile"
    return (path / "reports").is_dir() and _is_export(path / "export")


def marker_kind(directory: Path) -> str | None:
    """The kind in a directory's marker file ('compile', 'matrix', ...), None without one."""
    return _read_json(directory / MARKER).get("kind")


def write_marker(directory: Path, kind: str) -> None:
    (directory / MARKER).write_text(json.dumps({"kind": kind}) + "\n")


def check_replaceable(out: Path, force: bool, error: type[Gemma4CompileError] = Gemma4CompileError) -> None:
    """An existing non-empty `out` is replaced only with `force`, and only if this project wrote it."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not force:
        raise error(f"output directory {out} already exists (use --force to replace it)")
    if not out.is_dir() or not is_project_output(out):
        raise error(
            f"{out} was not written by gemma4-compile; --force replaces only its own outputs, "
            "so remove it yourself or choose another output"
        )


# ----- one writer per output -------------------------------------------------------------------------


@contextmanager
def output_lock(out: Path, error: type[Gemma4CompileError] = Gemma4CompileError) -> Iterator[None]:
    """Hold `.NAME.lock` beside `out` for the block; a second run on the same output is refused at once.

    The lock file is removed on release; a run that locked a file someone has just removed sees a different
    inode at the path and is refused too, so two runs never both believe they hold it."""
    lock = out.parent / _sibling(out, LOCK)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise error(f"cannot create {lock}: {e.strerror or e}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except OSError:
            held = False
        if not held:
            raise error(
                f"{out} is being written by another gemma4-compile run (lock {lock}); wait for it to finish"
            )
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)
    finally:
        os.close(fd)


# ----- atomic replacement ----------------------------------------------------------------------------


def recover_stale(out: Path) -> None:
    """Undo what a killed run left beside `out` (call with the lock held): a `.NAME.old.*` whose swap did not
    finish is put back if `out` is missing, else removed; `.NAME.tmp.*` folders are removed."""
    olds = sorted(out.parent.glob(_sibling(out, OLD) + ".*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    for stale in (*olds, *out.parent.glob(_sibling(out, TMP) + ".*")):
        _remove(stale)


def replace_directory(tmp: Path, out: Path) -> None:
    """Swap the complete `tmp` in for `out` so that the path always holds the old or the new output: the old one
    moves to `.NAME.old.*`, `tmp` takes its place, then the old one is removed. A kill between the two renames
    leaves the old output under the sibling name, which `recover_stale` puts back."""
    with _signals_deferred():
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_sibling(out, OLD) + ".", dir=out.parent))
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_directory(
    out: Path,
    error: type[Gemma4CompileError] = Gemma4CompileError,
    *,
    force: bool = False,
    inputs: Iterable[Path] = (),
    marker: str | None = None,
) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; on success it replaces `out`, on any failure (Ctrl-C
    included) it is removed and `out` is left as it was.

    Before anything is written: `out` is checked against `inputs` (check_output_path), locked (output_lock),
    cleaned of a killed run's leftovers, and refused if it exists and may not be replaced (check_replaceable).
    `marker` names the kind of output in a marker file, so a later `--force` recognizes it as ours."""
    out = Path(out)
    check_output_path(out, inputs, error)
    with output_lock(out, error):
        try:
            recover_stale(out)
        except OSError as e:
            raise error(f"cannot clean up after an earlier run on {out}: {e.strerror or e}") from None
        check_replaceable(out, force, error)
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_sibling(out, TMP) + ".", dir=out.parent))
        except OSError as e:
            raise error(f"cannot create {out}: {e.strerror or e}") from None
        try:
            yield tmp
            if marker is not None:
                write_marker(tmp, marker)
            tmp.chmod(0o777 & ~umask())  # mkdtemp makes it private
            replace_directory(tmp, out)
        except OSError as e:
            _remove(tmp)
            raise error(f"cannot write {out}: {e.strerror or e}") from None
        except BaseException:
            _remove(tmp)
            raise


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT / SIGTERM back during the two renames, so Ctrl-C cannot land between them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# ----- files ---------------------------------------------------------------------------------------------


def umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask alone must set one to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` only if the block completes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes it private; export files get what open() gives
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes | str) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def sha256_file(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----- hashing with a fast path ----------------------------------------------------------------------

HASH_CACHE = (
    ".gemma4-hashes.json"  # {name: {"sha256", "size", "mtime_ns", "ctime_ns", "ino"}}; never in `files`
)


def _stamp(path: Path) -> dict[str, int]:
    """What must be unchanged for a cached hash to stand: size, mtime and (unsettable by utime) ctime, inode."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def sha256_files(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each named file of `directory`. A hash in the sidecar cache (HASH_CACHE) is reused while the
    file's size, mtime, ctime and inode are what the cache recorded; any other file is rehashed and the cache
    rewritten, atomically and best effort (a read-only directory just rehashes every time)."""
    cache_file = directory / HASH_CACHE
    cache = _read_json(cache_file)
    hashes, changed = {}, False
    for name in names:
        path = directory / name
        stamp = _stamp(path)
        entry = cache.get(name)
        if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and entry.get("sha256"):
            hashes[name] = entry["sha256"]
            continue
        hashes[name] = sha256_file(path)
        cache[name] = {"sha256": hashes[name], **stamp}
        changed = True
    if changed:
        try:
            with atomic_file(cache_file) as tmp:
                tmp.write_text(json.dumps(cache, indent=1, sort_keys=True) + "\n")
        except OSError:
            pass  # the cache only saves time; a directory we may not write is hashed in full each call
    return hashes
