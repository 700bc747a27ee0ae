"""The wheel a fresh install builds: configs/ shipped as package data, no setuptools warnings, the
dependency set that makes `ray job submit` work (Ray's job server needs ray[default])."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "extract", "store", "encoders", "connectors", "data", "train", "evaluate", "compare", "configs")


def test_every_package_folder_is_listed_for_the_wheel():
    """A folder with an __init__.py that pyproject.toml does not list would be missing from a real install
    (an editable install hides it)."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {f"dualfocus.{p.parent.name}" for p in REPO.glob("*/__init__.py") if not p.parent.name.startswith(".")}
    assert folders - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert set(PACKAGES) == {name.split(".", 1)[1] for name in listed - {"dualfocus"}}


def test_wheel_ships_configs_without_setuptools_warnings(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", *(p.name for p in REPO.glob("*.py"))):
        shutil.copy(REPO / name, src / name)
    for name in PACKAGES:
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    # -v: without it pip hides what the build backend prints, warnings included
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "-v", "--no-deps", "--no-build-isolation",
                           "--no-index", "-w", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    warnings = re.findall(r"\w*Warning\b.*", output)  # BuildBackendWarning, SetuptoolsDeprecationWarning, ...
    assert not warnings, warnings

    (wheel,) = (tmp_path / "dist").glob("dualfocus-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    shipped = {f"dualfocus/configs/{p.name}" for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".json")}
    assert shipped and shipped <= names
    assert "dualfocus/cli.py" in names and "dualfocus/pipeline/json_records.py" in names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    ray = next(r for r in requires if r.startswith("ray"))
    assert "default" in ray and "data" in ray, ray
