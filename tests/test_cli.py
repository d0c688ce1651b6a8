import json
import shutil
import subprocess
import sys

import pytest

from spatialtranscriptformer.cli import build_parser


def test_console_script_points_at_main():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "stf"]
    assert ep.value == "spatialtranscriptformer.cli:main"
    assert callable(ep.load())


def test_parser_has_demo_and_benchmark():
    p = build_parser()
    args = p.parse_args(["demo", "--out", "x", "--epochs", "3"])
    assert args.command == "demo" and args.epochs == 3 and args.backbone == "handcrafted"
    args = p.parse_args(["benchmark", "--dataset", "her2st", "--backbone", "handcrafted"])
    assert args.command == "benchmark" and "ridge" in args.models
    with pytest.raises(SystemExit):
        p.parse_args(["nope"])


@pytest.mark.slow
def test_stf_demo_end_to_end(tmp_path):
    exe = shutil.which("stf") or f"{sys.executable} -m spatialtranscriptformer.cli"
    cmd = exe.split() + ["demo", "--out", str(tmp_path), "--epochs", "3", "--genes", "8", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "Held-out region" in res.stdout and ("beats the linear probes" in res.stdout or "does NOT beat" in res.stdout)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["mean_pearson_held_out"]) == {"stf", "ridge", "ridge_cv"}
    assert summary["verdict"] in res.stdout and summary["models"]["stf"]["n_pathways"] == 50
    assert (tmp_path / "demo_maps.png").stat().st_size > 10_000
    assert (tmp_path / "her2st_C2.zarr").is_dir()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries, no locks
    from spatialdata import read_zarr

    back = read_zarr(tmp_path / "her2st_C2.zarr")  # moved into place as a readable store
    t = back.tables["table"]
    # each model's predictions are its own tables, linked to the spots like the expression table
    assert {"stf_pred", "stf_pathways", "ridge_pred", "ridge_cv_pred"} <= set(back.tables)
    assert back.tables["stf_pred"].n_vars == 8 and back.tables["stf_pathways"].n_vars == 50
    assert back.tables["stf_pred"].obs_names.equals(t.obs_names)
    assert t.obs["stf_split"].value_counts().to_dict() == {"train": summary["training_spots"],
                                                            "held_out": summary["held_out_spots"]}
    assert t.uns["stf_demo"]["verdict"] == summary["verdict"]
