"""kernels/ and models/ install inside the fp4kv_jax namespace, never at top level."""

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"fp4kv_jax": "fp4kv_jax", "fp4kv_jax.kernels": "kernels", "fp4kv_jax.models": "models"}


def _packages_in_tree() -> set[str]:
    found = set()
    for package, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *relative)))
    return found


def test_pyproject_lists_every_package():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert setuptools["package-dir"] == MAPPED
    assert set(setuptools["packages"]) == _packages_in_tree()


def test_regular_install_has_no_top_level_kernels_or_models(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(tmp_path), str(ROOT)],
        check=True,
    )
    assert not (tmp_path / "kernels").exists() and not (tmp_path / "models").exists()
    assert (tmp_path / "fp4kv_jax" / "kernels" / "__init__.py").is_file()
    assert (tmp_path / "fp4kv_jax" / "models" / "configs.py").is_file()
    probe = "import fp4kv_jax.models.configs as c, fp4kv_jax.kernels as k; print(c.__file__)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    ).stdout
    assert out.startswith(str(tmp_path))
