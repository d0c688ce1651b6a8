"""``stf.pp.embed_distributed``: embed many slides on several devices / nodes with Lightning's predict loop."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._data import as_slide_list, get_table
from .._docs import (
    doc_embed_key,
    doc_embed_tiles,
    doc_image_slides,
    doc_params,
    doc_progress,
    doc_table_key,
    doc_upsampling,
)
from .._settings import settings
from ._backbones import get_backbone, pooled_features
from ._embed import embed_settings, embedding_params
from ._tiles import extract_tiles, tile_plan

if TYPE_CHECKING:
    from spatialdata import SpatialData


class _TileBatches:
    """Map-style dataset: item ``i`` = one batch of spatially neighbouring spots of one slide."""

    def __init__(self, slides, *, size, mpp, batch_size, table_key, image_key, preprocess, allow_upsampling=False):
        self.plans, self.items = [], []
        for si, s in enumerate(slides):
            adata = get_table(s, table_key)
            level, centers, scale = tile_plan(
                s, adata, tile_size=size, mpp=mpp, image_key=image_key, allow_upsampling=allow_upsampling
            )
            self.plans.append((level, centers, scale))
            order = np.lexsort((centers[:, 0], np.floor(centers[:, 1] / (size * scale * 4))))
            for b in range(0, len(order), batch_size):
                self.items.append((si, order[b : b + batch_size]))
        self.size = size
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        si, idx = self.items[i]
        level, centers, scale = self.plans[si]
        tiles = np.empty((len(idx), self.size, self.size, 3), np.uint8)
        pos = np.empty(len(idx), np.int64)
        n = 0
        for j, t in extract_tiles(level, centers[idx], size=self.size, scale=scale):
            tiles[n : n + len(j)], pos[n : n + len(j)] = t, idx[j]
            n += len(j)
        return si, pos, self.preprocess(tiles)


@doc_params(data=doc_image_slides, tiles=doc_embed_tiles, key=doc_embed_key, table_key=doc_table_key,
            progress=doc_progress, upsampling=doc_upsampling)
def embed_distributed(
    data: SpatialData | list,
    *,
    backbone: str | Any = "handcrafted",
    weights: str | os.PathLike | None = None,
    tile_size: int | None = None,
    mpp: float | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    accelerator: str = "auto",
    devices: int | str = "auto",
    num_nodes: int = 1,
    strategy: str = "auto",
    precision: str | None = None,
    scratch_dir: str | os.PathLike | None = None,
    key_added: str | None = None,
    overwrite: bool = False,
    image_key: str | None = None,
    table_key: str | None = None,
    allow_upsampling: bool = False,
    progress: bool | None = None,
) -> None:
    """Embed many slides on one or several GPUs / nodes through Lightning's predict loop.

    The work (batches of neighbouring spots of every slide still missing the embedding) is a map-style
    dataset that Lightning shards over processes with its distributed sampler (``strategy="ddp"``,
    ``devices``, ``num_nodes``); ``num_workers`` DataLoader workers cut and normalise tiles while the
    model computes. Each process writes its results to a shared temporary folder, and every process then
    assembles all of them into ``obsm`` — no home-made distribution. Run as a script under DDP (each
    process runs it) or with ``devices=1`` in a notebook. Same outputs as :func:`embed`.

    Parameters
    ----------
    {data}
    backbone
        A registered name or a ``torch.nn.Module``/callable (see :func:`embed`).
    {tiles}
    batch_size
        Tiles per batch.
    num_workers
        DataLoader worker processes that prepare tiles.
    accelerator, devices, num_nodes, strategy, precision
        :class:`lightning.pytorch.Trainer` settings (e.g. ``strategy="ddp"``, ``precision="bf16-mixed"``).
    scratch_dir
        Folder where the processes exchange results (default: the temporary folder); with several nodes
        it must be shared by all of them.
    {key}
    {table_key}
    {upsampling}
    {progress}

    Returns
    -------
    ``None``; writes ``obsm[key_added]`` and ``uns[key_added]["params"]`` on every slide's table.
    """
    import lightning.pytorch as lp
    import torch
    from torch.utils.data import DataLoader

    from .._validate import check_number

    check_number("tile_size", tile_size, minimum=1, integer=True, none_ok=True)
    check_number("mpp", mpp, minimum=0, exclusive=True, none_ok=True)
    check_number("batch_size", batch_size, minimum=1, integer=True)
    slides = as_slide_list(data)
    bb = get_backbone(backbone, weights=weights, device="cpu")
    if not bb.spec.is_torch:
        raise ValueError(f"Backbone {bb.name!r} is not a torch model; use `stf.pp.embed` for it.")
    key, size, res = embed_settings(bb, key_added=key_added, tile_size=tile_size, mpp=mpp)
    todo = [s for s in slides if overwrite or key not in get_table(s, table_key).obsm]
    if not todo:
        return None
    ds = _TileBatches(todo, size=size, mpp=res, batch_size=batch_size, table_key=table_key, image_key=image_key,
                      preprocess=bb.preprocess, allow_upsampling=allow_upsampling)
    base = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.gettempdir())

    def folder() -> Path:
        # evaluated after Lightning has launched the processes: all ranks of a run share MASTER_PORT
        return base / f"stf_embed_{os.environ.get('MASTER_PORT') or os.getpid()}"

    class _Module(lp.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = bb.model

        def predict_step(self, batch, batch_idx):
            si, pos, x = batch
            return si, pos, pooled_features(bb.spec, self.net, x).float().cpu()

    class _Writer(lp.callbacks.BasePredictionWriter):
        def __init__(self):
            super().__init__(write_interval="epoch")

        def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices):
            rows = [(int(si), pos.numpy(), f.numpy()) for si, pos, f in predictions]
            folder().mkdir(parents=True, exist_ok=True)
            from .._atomic import atomic_output

            with atomic_output(folder() / f"rank{trainer.global_rank}.npz") as tmp:  # whole or absent
                np.savez(tmp, si=np.concatenate([np.full(len(p), s) for s, p, _ in rows]),
                         pos=np.concatenate([p for _, p, _ in rows]), feats=np.concatenate([f for _, _, f in rows]))

    trainer = lp.Trainer(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy,
                         precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=settings.progress if progress is None else progress,
                         enable_model_summary=False, callbacks=[_Writer()])
    loader = DataLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers)
    with torch.inference_mode():
        trainer.predict(_Module(), loader, return_predictions=False)
    trainer.strategy.barrier()
    files = sorted(folder().glob("rank*.npz"))
    if len(files) != trainer.world_size:
        raise RuntimeError(f"Expected {trainer.world_size} result files in {folder()}, found {len(files)}; with "
                           "several nodes, `scratch_dir` must be a folder shared by all nodes.")
    parts = [dict(np.load(f)) for f in files]
    si = np.concatenate([p["si"] for p in parts])
    pos = np.concatenate([p["pos"] for p in parts])
    feats = np.concatenate([p["feats"] for p in parts]).astype(np.float32)
    for k, s in enumerate(todo):
        adata = get_table(s, table_key)
        emb = np.zeros((adata.n_obs, feats.shape[1]), np.float32)
        sel = si == k
        emb[pos[sel]] = feats[sel]
        adata.obsm[key] = emb
        adata.uns[key] = {"params": embedding_params(bb, weights=weights, tile_size=size, mpp=res, dim=feats.shape[1],
                                                     world_size=trainer.world_size)}
    trainer.strategy.barrier()
    if trainer.is_global_zero:
        shutil.rmtree(folder(), ignore_errors=True)
    return None
