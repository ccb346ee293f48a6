"""The README's two opening commands: CI runs the second verbatim, the first names real files."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _opening_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_test_command_verbatim():
    _, test_command = _opening_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f".ci/run must contain the README's test command: {test_command}"
    assert "pytest" in test_command


def test_the_main_command_lowers_a_shipped_sample_with_validation_and_a_report():
    main_command, _ = _opening_commands()
    sample = re.search(r"python -m onnx_lower (\S+)", main_command).group(1)
    assert (ROOT / sample).is_file(), f"{sample} is not in the repository"
    for flag in ("--validate", "--report"):
        assert flag in main_command
