"""Embedding many slides through Lightning's predict loop (single process and DDP with 2 CPU processes)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import spatialtranscriptformer as stf

SCRIPT = textwrap.dedent(
    """
    import sys

    import numpy as np
    import timm
    import torch

    import spatialtranscriptformer as stf

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0)
    slides = [stf.datasets.her2st(), stf.datasets.her2st()]
    stf.pp.embed_distributed(slides, backbone=net, key_added="X_t", tile_size=32, mpp=4.0, batch_size=16,
                             accelerator="cpu", devices=2, strategy="ddp", progress=False)
    rank = int(__import__("os").environ.get("RANK", "0"))
    if rank == 0:
        np.save(sys.argv[1], np.stack([s.tables["table"].obsm["X_t"] for s in slides]))
        open(sys.argv[1] + f".world{slides[0].tables['table'].uns['X_t']['params']['world_size']}", "w").close()
    """
)


def _tiny_net():
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model("resnet10t", pretrained=False, num_classes=0)


def test_embed_distributed_single_process_matches_embed(bundled_sdata):
    import spatialdata as sd

    a, b = sd.deepcopy(bundled_sdata), sd.deepcopy(bundled_sdata)
    net = _tiny_net()
    stf.pp.embed_distributed([a], backbone=net, key_added="X_t", tile_size=32, mpp=4.0, batch_size=16,
                             accelerator="cpu", devices=1, progress=False)
    stf.pp.embed(b, backbone=net, key_added="X_t", tile_size=32, mpp=4.0, progress=False)
    ea, eb = a.tables["table"].obsm["X_t"], b.tables["table"].obsm["X_t"]
    assert ea.shape == eb.shape and np.abs(ea).sum() > 0
    np.testing.assert_allclose(ea, eb, rtol=1e-3, atol=1e-3)
    assert a.tables["table"].uns["X_t"]["params"]["world_size"] == 1
    with pytest.raises(ValueError, match="not a torch model"):
        stf.pp.embed_distributed([a], backbone="handcrafted")


@pytest.mark.ddp
@pytest.mark.slow
def test_embed_distributed_ddp_two_cpu_processes(tmp_path, bundled_sdata):
    import spatialdata as sd

    script = tmp_path / "ddp_embed.py"
    script.write_text(SCRIPT)
    out = tmp_path / "emb.npy"
    env = dict(os.environ, PL_DISABLE_FORK="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "emb.npy.world2").exists()
    got = np.load(out)
    ref = sd.deepcopy(bundled_sdata)
    stf.pp.embed(ref, backbone=_tiny_net(), key_added="X_t", tile_size=32, mpp=4.0, progress=False)
    for k in range(2):  # both slides, every spot embedded once across the two processes
        np.testing.assert_allclose(got[k], ref.tables["table"].obsm["X_t"], rtol=1e-3, atol=1e-3)
