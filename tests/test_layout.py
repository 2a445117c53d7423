"""The package's layer rules (import-linter contracts in pyproject.toml) hold."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout


def test_library_api_is_importable_from_one_place():
    import pipelines.ml as ml

    for name in ml.__all__:
        assert getattr(ml, name).__module__.startswith("pipelines.ml.")
