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


def test_the_long_files_that_start_first_exist():
    # A renamed file would silently drop out of the order `make test` relies on for balance.
    from conftest import LONG_FILES

    tests = Path(__file__).resolve().parent
    assert [name for name in LONG_FILES if not (tests / name).is_file()] == []
