"""The shared cache: what runs build once per CONTENT and share, and the lock that makes one
process build each thing however many runs, ranks or nodes start together.

Contract:
- `cache_root(flag)`: the shared cache folder: the flag (--cache-dir), else $F2LLM_CACHE, else
  $XDG_CACHE_HOME/f2llm, else ~/.cache/f2llm. Everything in it is keyed by content and
  rebuilt when missing: deleting the folder is always safe.
- `content_key(parts)`: a short hex digest of a JSON-able description of what made something
  (seeds, the digests of the inputs, the code that built it): the name of its entry.
- `build_once(path, build)`: `path` (a file or folder) exists only complete and never changes:
  if it is missing, ONE process builds it (`build(tmp)` writes a temporary path, renamed to
  `path` when complete) while the others wait; a process that dies halfway leaves only its
  temporary path, which the next builder deletes.
- `take_lock(lock, stale_after_s)`: the O_EXCL lock behind build_once and runtime/tokens.py,
  with its stale-lock rule.
Importing this file does nothing.
"""
import glob
import hashlib
import json
import os
import shutil
import socket
import threading
import time


def cache_root(flag: str = "") -> str:
    """--cache-dir, else $F2LLM_CACHE, else $XDG_CACHE_HOME/f2llm, else ~/.cache/f2llm."""
    if flag or os.environ.get("F2LLM_CACHE"):
        return os.path.abspath(flag or os.environ["F2LLM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "f2llm")


def content_key(parts) -> str:
    """16 hex digits of sha256 over the canonical JSON of `parts`."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def file_digest(path: str) -> str:
    """sha256 of a file's bytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def build_once(path: str, build, log=print, stale_after_s: float = 600.0,
               poll_s: float = 1.0) -> str:
    """-> path, built by ONE process of all that share the cache if it is missing. The builder
    holds `{path}.lock` (`take_lock`) and touches it while it builds (so a long build is never
    taken for a dead one); `build(tmp)` writes `{path}.tmp-HOST-PID` (a file or a folder),
    renamed to `path` when it returns. The others poll until `path` exists."""
    told = False
    while not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        lock = path + ".lock"
        if not take_lock(lock, stale_after_s):
            if not told:
                log(f"  waiting for another process to build {path}")
                told = True
            time.sleep(poll_s)
            continue
        tmp = f"{path}.tmp-{socket.gethostname()}-{os.getpid()}"
        alive = threading.Event()
        heartbeat = threading.Thread(target=_touch_until, daemon=True,
                                     args=(lock, alive, stale_after_s / 4))
        try:
            if not os.path.exists(path):
                for old in glob.glob(glob.escape(path) + ".tmp-*"):  # a dead builder's
                    _remove_tree(old)
                heartbeat.start()
                t0 = time.time()
                build(tmp)
                os.rename(tmp, path)
                log(f"  built {path} in {time.time() - t0:.0f} s")
        finally:
            alive.set()
            if heartbeat.is_alive():
                heartbeat.join()
            _remove_tree(tmp)  # a build that failed: nothing half-made under any name
            os.unlink(lock)
    return path


def _touch_until(lock: str, done: threading.Event, every: float) -> None:
    while not done.wait(every):
        os.utime(lock)


def _remove_tree(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _remove(path)


def take_lock(lock: str, stale_after_s: float) -> bool:
    """Take `lock` (O_CREAT | O_EXCL: exactly one process succeeds, also on NFS v3+). A lock is
    stale if its builder is a dead process of this host, or if it was not touched for
    `stale_after_s` (a builder touches it while it works). Breaking a stale lock needs
    `{lock}.break`, taken the same way, and a second look: two processes that both saw it
    stale cannot both delete it, and nobody deletes a lock taken in between."""
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if not _stale(lock, stale_after_s):
            return False
        breaker = lock + ".break"
        try:
            os.close(os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:  # someone else is breaking it (or died in these lines)
            if _age(breaker) > stale_after_s:
                _remove(breaker)
            return False
        try:
            if _stale(lock, stale_after_s):
                _remove(lock)
        finally:
            os.unlink(breaker)
        return take_lock(lock, stale_after_s)
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _stale(lock: str, stale_after_s: float) -> bool:
    try:
        with open(lock) as f:
            host, pid = (f.read().split() + ["", ""])[:2]
    except FileNotFoundError:
        return True  # released meanwhile: try again
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return True
    return _age(lock) > stale_after_s


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except FileNotFoundError:
        return 0.0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
