"""Atomic outputs: killed writers, concurrent writers and full disks never lose or half-write an output."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer import _atomic
from spatialtranscriptformer._atomic import OutputLockedError, atomic_output, leftovers

SRC = Path(stf.__file__).resolve().parents[1]
GENES = [f"G{i}" for i in range(8)]


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _snapshot(p: Path) -> dict:
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny STF model and a ridge probe on the same toy slides."""
    from conftest import _toy_slide

    slides = [_toy_slide("A", "P1", seed=0), _toy_slide("B", "P2", seed=1)]
    kw = {"embedding_key": "X_toy", "genes": GENES, "progress": False}
    stf_model = stf.tl.fit(slides, model="stf", max_epochs=1, validation=None, data_kwargs={"gene_sets": None},
                           model_kwargs={"token_dim": 16, "n_layers": 1, "n_heads": 2, "interactions": "all"}, **kw)
    ridge = stf.tl.fit(slides, model="ridge", **kw)
    return {"stf": stf_model, "ridge": ridge, "slide": _toy_slide("C", "P3", seed=2)}


# --- the helper itself ---------------------------------------------------------------------------------------


def test_file_and_folder_written_whole_and_nothing_left(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_output(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.txt.stf-tmp-") and tmp.suffix == ".txt"
        tmp.write_text("one")
        assert not target.exists()  # not visible before the block ends
    assert target.read_text() == "one" and _hidden(tmp_path) == []
    folder = tmp_path / "store.zarr"
    with atomic_output(folder, kind="dir") as tmp:
        (tmp / "a").write_text("1")
    with atomic_output(folder, kind="dir", overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]  # replaced whole, no stale file
    assert _hidden(tmp_path) == []


def test_error_in_block_keeps_previous_output(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and _hidden(tmp_path) == []
    with pytest.raises(FileExistsError, match="overwrite=True"), atomic_output(target, overwrite=False):
        pass
    with pytest.raises(FileExistsError, match="not a folder"), atomic_output(target, kind="dir"):
        pass
    assert target.read_text() == "old"


def test_failed_swap_restores_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "x").write_text("old")
    real = os.rename
    calls = []

    def flaky(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".m.stf-tmp-"):  # moving the new folder in fails (e.g. EXDEV, EIO)
            raise OSError(errno.EIO, "I/O error")
        return real(src, dst)

    monkeypatch.setattr(_atomic.os, "rename", flaky)
    with pytest.raises(OSError, match="I/O error"), atomic_output(folder, kind="dir") as tmp:
        (tmp / "y").write_text("new")
    assert (folder / "x").read_text() == "old" and not (folder / "y").exists()
    assert _hidden(tmp_path) == []
    assert calls[0][1].startswith(".m.stf-old-")  # the old one was moved aside, then back


def test_interrupted_swap_is_repaired_by_next_writer(tmp_path):
    """A writer killed between moving the old output aside and the new one in: the old one comes back."""
    aside = tmp_path / ".m.stf-old-999999-deadbeef"
    aside.mkdir()
    (aside / "config.json").write_text("old model")
    half = tmp_path / ".m.stf-tmp-999999-cafecafe"
    half.mkdir()
    (half / "weights.pt").write_text("half")
    assert [p.name for p in leftovers(tmp_path / "m")] == [aside.name, half.name]
    _atomic.clean_stale(tmp_path / "m")  # pid 999999 is not running
    assert (tmp_path / "m" / "config.json").read_text() == "old model"
    assert _hidden(tmp_path) == []


def test_leftovers_kept_while_their_writer_runs_then_cleaned_by_any_writer_in_the_folder(tmp_path):
    """A default store name is never written twice: its leftovers go once no writer holds its lock."""
    half = tmp_path / ".store_1234abcd.zarr.stf-tmp-999999-0123abcd.zarr"
    half.mkdir()
    (half / "chunk").write_text("x")
    (tmp_path / ".dead.zarr.stf-lock").write_text("999999")  # the lock file of a killed writer
    with _atomic.target_lock(tmp_path / "store_1234abcd.zarr"):  # its writer is still running
        assert _atomic.clean_stale(tmp_path / "store_1234abcd.zarr") == []
        with atomic_output(tmp_path / "other.zarr", kind="dir"):
            pass
        assert half.exists()
    with atomic_output(tmp_path / "another.zarr", kind="dir"):  # the writer is gone: removed
        pass
    assert not half.exists() and _hidden(tmp_path) == []


def test_concurrent_writers_in_threads(tmp_path):
    target = tmp_path / "out.txt"
    inside, release = threading.Event(), threading.Event()

    def slow():
        with atomic_output(target) as tmp:
            tmp.write_text("first")
            inside.set()
            release.wait(10)

    th = threading.Thread(target=slow)
    th.start()
    assert inside.wait(10)
    with pytest.raises(OutputLockedError, match=r"out.txt is being written by another writer \(process"):
        with atomic_output(target) as tmp:
            tmp.write_text("second")
    release.set()
    th.join()
    assert target.read_text() == "first" and _hidden(tmp_path) == []


# --- real writers in a subprocess: SIGKILL, concurrent processes ----------------------------------------------

_SLOW_SAVE = textwrap.dedent(
    """
    import sys, time
    import pandas as pd
    sys.path.insert(0, {src!r})
    from spatialtranscriptformer.tl import TrainedModel
    model = TrainedModel.load({src_model!r})
    real = pd.DataFrame.to_csv
    def slow(self, path, *a, **k):  # half-way through the save: signal, then hang
        real(self, path, *a, **k)
        open({marker!r}, "w").close()
        time.sleep(120)
    pd.DataFrame.to_csv = slow
    model.save({target!r}, overwrite=True)
    """
)


def _start_slow_save(src_model: Path, target: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "halfway"
    code = _SLOW_SAVE.format(src=str(SRC), src_model=str(src_model), target=str(target), marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": "1"})
    t0 = time.time()
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the writer exited early ({proc.returncode})")
        if time.time() - t0 > 120:
            proc.kill()
            raise AssertionError("the writer never got half-way")
        time.sleep(0.1)
    return proc, marker


@pytest.mark.slow
def test_sigkill_mid_save_keeps_previous_model_and_next_save_cleans_up(models, tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    models["ridge"].save(old)  # the output in place: a ridge probe
    models["stf"].save(new)  # what the killed process will be writing over it
    before = _snapshot(old)
    proc, _ = _start_slow_save(new, old, tmp_path)
    # a second process writing the same folder meanwhile is refused, not raced
    with pytest.raises(OutputLockedError, match="being written by another writer"):
        models["stf"].save(old, overwrite=True)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert _snapshot(old) == before  # the previous model, untouched
    assert stf.tl.TrainedModel.load(old).model_name == "ridge"
    assert any(".old.stf-tmp-" in n for n in _hidden(tmp_path))  # the killed writer's temporary
    models["stf"].save(old, overwrite=True)  # the next writer removes it
    assert not [n for n in _hidden(tmp_path) if n.startswith(".old.")]
    reloaded = stf.tl.TrainedModel.load(old)
    assert reloaded.model_name == "stf" and sorted(p.name for p in old.iterdir()) == sorted(
        p.name for p in new.iterdir()
    )


# --- model folders ------------------------------------------------------------------------------------------


def test_overwrite_other_model_family_leaves_no_stale_weights(models, tmp_path):
    p = tmp_path / "m"
    models["stf"].save(p)
    assert (p / "weights.pt").is_file()
    models["ridge"].save(p, overwrite=True)
    assert sorted(f.name for f in p.iterdir()) == ["config.json", "history.csv", "ridge.npz"]
    loaded = stf.tl.TrainedModel.load(p)
    assert loaded.model_name == "ridge"
    models["stf"].save(p, overwrite=True)
    assert not (p / "ridge.npz").exists() and stf.tl.TrainedModel.load(p).model_name == "stf"


def test_save_never_replaces_a_folder_of_other_files(models, tmp_path):
    p = tmp_path / "results"
    p.mkdir()
    (p / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="does not hold a saved spatialtranscriptformer model"):
        models["ridge"].save(p, overwrite=True)
    assert [f.name for f in p.iterdir()] == ["notes.txt"] and _hidden(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    models["ridge"].save(empty)  # an empty folder is fine
    assert (empty / "config.json").is_file()


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_enospc_during_overwrite_keeps_old_model(models, tmp_path, monkeypatch):
    import pandas as pd

    p = tmp_path / "m"
    models["ridge"].save(p)
    before = _snapshot(p)
    monkeypatch.setattr(pd.DataFrame, "to_csv", _enospc)  # the disk fills up half-way through the new model
    with pytest.raises(OSError, match="No space left"):
        models["stf"].save(p, overwrite=True)
    assert _snapshot(p) == before and _hidden(tmp_path) == []
    monkeypatch.undo()
    pred_old = stf.tl.TrainedModel.load(p)
    assert pred_old.model_name == "ridge"


def test_enospc_during_superres_keeps_old_store_and_slide(tmp_path, monkeypatch):
    from spatialtranscriptformer.tl import _superres_predict
    from test_superres_save import manual_model, rebuildable_backbone

    sd = stf.datasets.synthetic(n_genes=3, n_pathways=2, size_um=200, seed=1)
    model = manual_model(rebuildable_backbone())
    store = tmp_path / "pred.zarr"
    stf.tl.predict_superres(sd, model, store=store, progress=False)
    before = _snapshot(store)
    element = sd.images["stf_superres"]
    n_before = len(sd.images)
    real = _superres_predict._compute

    def fill_disk(p, root_path, *a, **k):
        real(p, root_path, *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_superres_predict, "_compute", fill_disk)
    with pytest.raises(OSError, match="No space left"):
        stf.tl.predict_superres(sd, model, store=store, overwrite=True, progress=False)
    assert _snapshot(store) == before and _hidden(tmp_path) == []
    assert sd.images["stf_superres"] is element and len(sd.images) == n_before


def test_superres_over_slides_all_or_nothing(tmp_path):
    from spatialdata import deepcopy

    from test_superres_save import manual_model, rebuildable_backbone

    good = stf.datasets.synthetic(n_genes=3, n_pathways=2, size_um=200, seed=1)
    bad = deepcopy(good)
    bad.tables["table"].uns["stf_slide"]["mpp"] = -1
    model = manual_model(rebuildable_backbone())
    stf.settings.cache_dir, old = tmp_path / "cache", stf.settings._cache_dir
    try:
        with pytest.raises(ValueError, match="slide 1: .*microns per pixel"):
            stf.tl.predict([good, bad], model, progress=False)
        assert "stf_superres" not in good.images and "stf_superres" not in good.tables["table"].uns
        assert not (tmp_path / "cache" / "superres").exists() or not any((tmp_path / "cache" / "superres").iterdir())
    finally:
        stf.settings._cache_dir = old


def test_embed_over_slides_all_or_nothing():
    import torch

    s1 = stf.datasets.synthetic(n_spots=12, n_genes=4, n_pathways=2, seed=0)
    from spatialdata import deepcopy

    s2 = deepcopy(s1)

    class FailSecond(torch.nn.Module):
        calls = 0

        def forward(self, x):
            FailSecond.calls += 1
            if FailSecond.calls > 1:
                raise RuntimeError("backbone failed on the second slide")
            return x.mean(dim=(2, 3))

    with pytest.raises(RuntimeError, match="second slide"):
        stf.pp.embed([s1, s2], backbone=FailSecond(), tile_size=16, mpp=1.0, batch_size=64, key_added="X_t",
                     progress=False)
    assert "X_t" not in s1.tables["table"].obsm and "X_t" not in s1.tables["table"].uns


def test_predict_refuses_nan_before_writing(models):
    import copy

    import torch

    m = copy.deepcopy(models["stf"])
    with torch.no_grad():
        for p in m.module.parameters():
            p.fill_(float("nan"))
    a = models["slide"].copy()
    keys = (set(a.layers), set(a.obsm), set(a.uns))
    with pytest.raises(ValueError, match="NaN/inf; nothing was written"):
        stf.tl.predict(a, m)
    assert (set(a.layers), set(a.obsm), set(a.uns)) == keys
    np.testing.assert_array_equal(a.X, models["slide"].X)


def test_report_and_figure_files_are_atomic(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.figure

    from spatialtranscriptformer.pl._utils import finish

    fig = matplotlib.figure.Figure()
    fig.add_subplot().plot([0, 1])
    target = tmp_path / "fig.png"
    target.write_bytes(b"old figure")
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _enospc)
    with pytest.raises(OSError, match="No space left"):
        finish(fig, None, show=False, save=target, return_fig=True, user_ax=False)
    assert target.read_bytes() == b"old figure" and _hidden(tmp_path) == []
    monkeypatch.undo()
    finish(fig, None, show=False, save=target, return_fig=True, user_ax=False)
    assert target.read_bytes()[:4] == b"\x89PNG"
