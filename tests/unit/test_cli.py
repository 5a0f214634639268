"""The command line's error handling (the pipeline itself is tested in tests/pipeline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellmap2d.cli import main


def test_missing_manifest_is_one_clear_error(tmp_path: Path, capsys) -> None:
    missing = tmp_path / "brains.csv"
    assert main(["run", "--manifest", str(missing), "--local-scheduler"]) == 2
    err = capsys.readouterr().err
    assert "manifest not found" in err and str(missing) in err


def test_manifest_without_columns_names_them(tmp_path: Path, capsys) -> None:
    manifest = tmp_path / "brains.csv"
    manifest.write_text("brain_id,path\n0012,brain.ome.zarr\n")
    assert main(["run", "--manifest", str(manifest), "--local-scheduler"]) == 2
    err = capsys.readouterr().err
    assert "signal_channel" in err and str(manifest) in err


def test_run_requires_a_manifest() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["run"])
    assert exc.value.code != 0
