"""Distributed data-parallel training through Lightning's DDP strategy (2 CPU processes, gloo)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import sys

    import anndata as ad
    import numpy as np
    import pandas as pd

    from lightning.pytorch.callbacks import Callback

    import spatialtranscriptformer as stf


    class Ranks(Callback):
        def on_train_start(self, trainer, pl_module):
            name = f"rank{trainer.global_rank}_of_{trainer.world_size}_{trainer.strategy.root_device.type}"
            open(sys.argv[2] + "/" + name, "w").close()


    rng = np.random.default_rng(0)
    W = rng.normal(size=(8, 6))
    slides = []
    for i in range(4):
        n = 30
        xy = np.stack(np.meshgrid(np.arange(6), np.arange(5)), -1).reshape(-1, 2) * 100.0
        emb = rng.normal(size=(n, 8)).astype(np.float32)
        counts = rng.poisson(np.exp(0.4 * emb @ W + 1)).astype(np.float32)
        obs = pd.DataFrame({"slide_id": f"s{i}", "patient_id": f"p{i}"}, index=[f"s{i}_{j}" for j in range(n)])
        a = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(6)]))
        a.layers["counts"] = counts.copy()
        a.obsm["spatial"] = xy
        a.obsm["X_toy"] = emb
        a.uns["stf_slide"] = {"mpp": 1.0, "slide_id": f"s{i}"}
        slides.append(a)
    model = stf.tl.fit(
        slides, genes=4, data_kwargs={"gene_sets": None, "val_fraction": 0.5}, max_epochs=2, validation="slide",
        model_kwargs={"token_dim": 16, "n_heads": 2, "num_pathways": 4}, accelerator="cpu", devices=2,
        strategy="ddp", progress=False, callbacks=[Ranks()],
    )
    if model.is_global_zero:
        model.save(sys.argv[1])
    """
)


@pytest.mark.ddp
@pytest.mark.slow
def test_fit_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT)
    out = tmp_path / "model"
    env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), str(out), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0_of_2_cpu").exists() and (tmp_path / "rank1_of_2_cpu").exists()
    import numpy as np

    import spatialtranscriptformer as stf

    model = stf.tl.TrainedModel.load(out)
    assert len(model.history) == 2
    assert np.isfinite(model.history["val_pcc"]).all()
    pred = model.predict_arrays(np.zeros((5, 8), np.float32), np.arange(10, dtype=np.float32).reshape(5, 2) * 100)
    assert pred["expr"].shape == (5, 4) and np.isfinite(pred["expr"]).all()
