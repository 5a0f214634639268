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


@pytest.fixture
def restore_settings():
    """``cellmap2d run`` writes its flags into the process-wide luigi config: undo that."""
    import luigi.configuration

    config = luigi.configuration.get_config()
    saved = dict(config.items("cellmap2d")) if config.has_section("cellmap2d") else {}
    yield
    for key in list(dict(config.items("cellmap2d"))):
        config.remove_option("cellmap2d", key)
    for key, value in saved.items():
        config.set("cellmap2d", key, value)


def test_deepslice_without_weights_fails_at_once(tmp_path: Path, capsys, restore_settings) -> None:
    """Offline, DeepSlice cannot fetch its weights: the run stops before any task, saying why."""
    manifest = tmp_path / "brains.csv"
    manifest.write_text(
        "brain_id,path,signal_channel,autofluorescence_channel,section_spacing_um\n"
        "b1,b1.ome.zarr,0,1,100\n"
    )
    code = main(
        [
            "run",
            "--manifest",
            str(manifest),
            "--store",
            str(tmp_path / "store"),
            "--anchoring",
            "deepslice",
            "--deepslice-weights",
            str(tmp_path / "weights"),
            "--local-scheduler",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "deepslice" in err.lower()
    assert "cellmap2d[deepslice]" in err or str(tmp_path / "weights") in err
    assert not (tmp_path / "store").exists()
