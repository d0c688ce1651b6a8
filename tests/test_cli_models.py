"""``stf fit`` / ``stf predict`` / ``stf evaluate``: thin wrappers over the library, one-line user errors."""

import argparse
import shutil

import numpy as np
import pandas as pd
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K
from spatialtranscriptformer.cli import build_parser, main

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """Two synthetic slides with 16-d embeddings, written as zarr stores."""
    root = tmp_path_factory.mktemp("cli")
    paths = []
    for i, s in enumerate(stf.datasets.synthetic(n_slides=2, n_spots=120, n_genes=30, seed=0)):
        t = s.tables["table"]
        t.obsm["X_test"] = np.random.default_rng(i).normal(size=(t.n_obs, 16)).astype("float32")
        paths.append(root / f"slide{i}.zarr")
        s.write(paths[-1])
    return paths


def _run(argv, capsys):
    """Exit status, stdout and stderr of ``stf argv`` run in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_every_option_has_help_and_a_default():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"fit", "predict", "evaluate", "demo", "benchmark"} <= set(subs.choices)
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help, f"stf {name} {action.option_strings[0]} has no help"
            if not action.required:
                assert "default" in action.help, f"stf {name} {action.option_strings[0]}: help names no default"


def test_version(capsys):
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and stf.__version__ in out


def test_design_flags_reach_the_model(stores):
    from spatialtranscriptformer._cli_models import fit_options

    args = build_parser().parse_args(
        ["fit", str(stores[0]), "--out", "m", "--interactions", "p2p", "p2h", "--pathway-init", "--token-dim", "32",
         "--n-layers", "3", "--num-pathways", "7", "--loss", "zinb", "--pathway-loss-weight", "0.5",
         "--no-log-transform", "--context-radius", "none", "--gene-sets", "none", "--genes", "A,B"])
    kw = fit_options(args)
    assert kw["model_kwargs"] == {"interactions": ["p2p", "p2h"], "pathway_init": True, "token_dim": 32,
                                  "n_layers": 3, "num_pathways": 7}
    assert kw["loss"] == "zinb" and kw["plan_kwargs"] == {"pathway_loss_weight": 0.5} and kw["genes"] == ["A", "B"]
    assert kw["data_kwargs"] == {"context_radius": None, "log_transform": False, "gene_sets": None}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["fit", "{missing}", "--out", "{out}"], "does not exist"),
        (["fit", "{store}", "--out", "{out}", "--model", "ridge", "--token-dim", "8"], "--token-dim does not apply"),
        (["fit", "{store}", "--out", "{out}", "--loss", "nope"], "Unknown loss 'nope'"),
        (["fit", "{store}", "--out", "{out}", "--model-kwargs", "{{bad"], "not valid JSON"),
        (["fit", "{store}", "--out", "{out}", "--model", "superres", "--context-radius", "2"], "do not apply"),
        (["fit", "{store}", "--out", "{store}"], "is an input"),
        (["fit", "{store}", "--out", "{tmp}/no/such/folder"], "does not exist"),
        (["fit", "{store}", "--out", "{out}", "--epochs", "0"], "must be >= 1"),
        (["predict", "{store}", "--model", "{store}", "--out", "{out}"], "No saved model"),
        (["evaluate", "{store}", "--features", "cells"], "invalid choice"),
    ],
)
def test_user_errors_are_one_line_and_leave_nothing(argv, message, stores, tmp_path, capsys):
    fill = {"missing": tmp_path / "missing.zarr", "out": tmp_path / "out", "store": stores[0], "tmp": tmp_path}
    code, out, err = _run([a.format(**fill) for a in argv], capsys)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"stf {argv[0]}: error:") and message in lines[-1], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # no output folder behind


@pytest.mark.slow
def test_fit_predict_evaluate_round_trip(stores, tmp_path, capsys):
    model_dir, pred = tmp_path / "model", tmp_path / "pred.zarr"
    code, out, err = _run(["fit", *stores, "--out", model_dir, "--epochs", "2", "--genes", "8", "--token-dim", "16",
                           "--gene-sets", "none", "--num-pathways", "5", "--quiet"], capsys)
    assert code == 0, err
    model = stf.tl.BaseModel.load(model_dir)
    assert len(model.genes) == 8 and model.model_name == "stf" and model.module.token_dim == 16
    code, out, err = _run(["fit", *stores, "--out", model_dir, "--epochs", "2", "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err  # a saved model is not replaced silently

    code, out, err = _run(["predict", stores[1], "--model", model_dir, "--out", pred, "--quiet",
                           "--return-attention"], capsys)
    assert code == 0, err
    from spatialdata import read_zarr

    back = read_zarr(pred)
    assert back.tables[K.PRED_KEY].n_vars == 8 and back.tables[K.PRED_PATHWAY_KEY].n_vars == 5
    att = back.tables["table"].obsm[K.ATTENTION_KEY]
    assert att.shape == (back.tables["table"].n_obs, 5) and np.isfinite(np.asarray(att)).all()
    assert K.PRED_KEY not in read_zarr(stores[1]).tables  # the input store is untouched

    csv = tmp_path / "metrics.csv"
    code, out, err = _run(["evaluate", pred, "--out", csv, "--quiet"], capsys)
    assert code == 0, err
    stored = pd.read_csv(csv)
    # the same scores as the library's, and the same as predicting on the fly with --model
    lib = stf.tl.evaluate(read_zarr(pred))
    np.testing.assert_allclose(np.sort(stored["pearson"].to_numpy()), np.sort(lib["pearson"].to_numpy()), atol=1e-5)
    code, out2, err = _run(["evaluate", stores[1], "--model", model_dir, "--quiet"], capsys)
    assert code == 0, err
    assert out2.splitlines()[-1] == out.splitlines()[-2]  # the same per-slide summary row
    code, out, err = _run(["evaluate", pred, "--out", csv, "--quiet"], capsys)
    assert code == 2 and "--overwrite" in err


def test_failed_fit_leaves_no_model_folder(stores, tmp_path, capsys):
    # an embedding key the stores do not have: found while reading the data, before training; nothing written
    code, out, err = _run(["fit", *stores, "--out", tmp_path / "m", "--embedding-key", "X_nope", "--epochs", "1",
                           "--quiet"], capsys)
    assert code == 2 and "X_nope" in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()
    shutil.rmtree(tmp_path, ignore_errors=True)
