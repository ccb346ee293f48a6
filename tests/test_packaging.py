"""The wheel: ``passes/`` installs as ``onnx_lower.passes``, never as a top-level ``passes``.

A generic top-level name in site-packages collides with other projects; the package-dir mapping
in ``pyproject.toml`` keeps the folder where the project card puts it and installs it under the
project's own namespace.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
    done = subprocess.run([*cmd, "-w", str(out), str(REPO)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot build a wheel here (pip wheel failed): {done.stderr[-300:]}")
    (path,) = out.glob("onnx_lower-*.whl")
    return path


def test_wheel_has_no_top_level_passes(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"onnx_lower"}, tops
    assert "onnx_lower/passes/__init__.py" in names
    assert "onnx_lower/passes/conv.py" in names
    assert "onnx_lower/passes/im2col/conv.py" in names  # the im2col package


def test_passes_import_under_the_package_name() -> None:
    import onnx_lower.passes as passes_pkg
    from onnx_lower.pass_manager import registered_passes

    assert Path(passes_pkg.__file__).resolve().parent == REPO / "passes"
    assert "lower-conv" in registered_passes()
