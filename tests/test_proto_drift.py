"""The committed stubs are exactly what scripts/gen_protos.py generates from protos/*.proto."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.unit


def test_generated_stubs_match_the_proto_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_drift_is_detected(tmp_path: Path) -> None:
    """A stub edited by hand makes the check fail (so the check above can fail too)."""
    shutil.copytree(
        ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "gen_protos.py", tmp_path / "scripts")
    (tmp_path / "protos" / "autoglm" / "v1" / "agent_pb2.py").write_text("# edited by hand\n")
    result = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "agent_pb2.py" in result.stderr
