"""The public contract: buf lint with the real buf, and generated code that matches the protos."""

from __future__ import annotations

import shutil
import subprocess
import sys

from posemesh.mesh.settings import REPO_ROOT


def test_buf_lint_passes():
    buf = shutil.which("buf", path=str(REPO_ROOT / ".venv" / "bin")) or shutil.which("buf")
    assert buf, "buf not installed (pip install buf-bin)"
    result = subprocess.run([buf, "lint"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_matches_protos():
    result = subprocess.run([sys.executable, "-m", "posemesh.devstack.codegen", "--check"], cwd=REPO_ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
