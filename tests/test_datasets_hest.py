"""``stf.datasets.hest``: HEST-1k cohorts selected by metadata, read from a local folder, downloaded when asked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialtranscriptformer as stf
from spatialtranscriptformer import _constants as K

# the columns of the HEST-1k release table (HEST_v1_1_0.csv, mahmoodlab/HEST assets/)
HEST_COLUMNS = [
    "dataset_title", "id", "image_filename", "organ", "disease_state", "oncotree_code", "species", "patient",
    "st_technology", "data_publication_date", "license", "study_link", "download_page_link1", "inter_spot_dist",
    "spot_diameter", "spots_under_tissue", "preservation_method", "nb_genes", "treatment_comment",
    "pixel_size_um_embedded", "pixel_size_um_estimated", "magnification", "fullres_px_width", "fullres_px_height",
    "tissue", "disease_comment", "subseries", "hest_version_added",
]  # fmt: skip

SAMPLES = [  # id, organ, oncotree_code, species, technology, patient
    ("TENX1", "Bowel", "COAD", "Homo sapiens", "Visium", "P1"),
    ("TENX2", "Bowel", "READ", "Homo sapiens", "Visium", "P2"),
    ("MEND3", "Bowel", np.nan, "Mus musculus", "Visium", "M1"),
    ("NCBI4", "Breast", "IDC", "Homo sapiens", "Spatial Transcriptomics", "P4"),
    ("TENX5", "Bowel", "COAD", "Homo sapiens", "Xenium", "P5"),
]
MPP = 2.0


def _write_sample(root: Path, sid: str, *, seed: int, json_meta: dict | None) -> None:
    import tifffile

    for sub in ("st", "wsis", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    with tifffile.TiffWriter(root / "wsis" / f"{sid}.tif") as tw:
        tw.write(img, subifds=1, photometric="rgb", tile=(64, 64))
        tw.write(img[::2, ::2], subfiletype=1, photometric="rgb", tile=(64, 64))
    g = np.arange(4)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) * 50.0 + 40.0  # 100 µm pitch at 2 µm/px
    a = ad.AnnData(
        X=sp.csr_matrix(rng.poisson(2.0, size=(len(xy), 6)).astype(np.float32)),
        obs=pd.DataFrame(index=[f"{sid}_{i}" for i in range(len(xy))]),
        var=pd.DataFrame(index=[f"G{i}" for i in range(6)]),
    )
    a.obsm["spatial"] = xy
    a.write_h5ad(root / "st" / f"{sid}.h5ad")
    if json_meta is not None:
        (root / "metadata" / f"{sid}.json").write_text(json.dumps(json_meta))


def _table() -> pd.DataFrame:
    rows = []
    for sid, organ, onco, species, tech, patient in SAMPLES:
        row = dict.fromkeys(HEST_COLUMNS, np.nan)
        row.update(
            id=sid, organ=organ, oncotree_code=onco, species=species, st_technology=tech, patient=patient,
            disease_state="Cancer" if isinstance(onco, str) else "Healthy", pixel_size_um_estimated=MPP,
            pixel_size_um_embedded=MPP, spot_diameter=55.0, inter_spot_dist=100.0, image_filename=f"{sid}.tif",
            license="CC BY 4.0", dataset_title=f"study of {sid}",
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=HEST_COLUMNS)


@pytest.fixture(scope="module")
def hest_root(tmp_path_factory) -> Path:
    """A HEST-1k folder: st/, wsis/, metadata/ and an older and a newer release csv."""
    root = tmp_path_factory.mktemp("hest_cohort")
    table = _table()
    for i, row in table.iterrows():
        meta = {k: (None if pd.isna(v) else v) for k, v in row.items()} if i % 2 == 0 else None  # some json, some not
        _write_sample(root, row["id"], seed=i, json_meta=meta)
    table.to_csv(root / "HEST_v1_10_0.csv", index=False)  # newest (version compared as numbers, not text)
    table.assign(organ="Liver").to_csv(root / "HEST_v1_9_0.csv", index=False)
    return root


def test_metadata_selection_by_fields(hest_root):
    sel = stf.datasets.hest_metadata(hest_root, organ="bowel", species="Homo sapiens", st_technology="Visium")
    assert sel["id"].tolist() == ["TENX1", "TENX2"]  # the newest csv (v1_10_0, not v1_9_0), case-insensitive
    sel = stf.datasets.hest_metadata(hest_root, oncotree_code=["COAD", "IDC"])
    assert sel["id"].tolist() == ["TENX1", "NCBI4", "TENX5"]
    sel = stf.datasets.hest_metadata(hest_root, species=lambda c: c.str.startswith("Mus"))
    assert sel["id"].tolist() == ["MEND3"]
    sel = stf.datasets.hest_metadata(hest_root, ids=["TENX2", "TENX1"], organ="Bowel")
    assert sel["id"].tolist() == ["TENX2", "TENX1"]  # the order asked for


def test_metadata_selection_errors(hest_root):
    with pytest.raises(KeyError, match="'tumour' is not a field.*'oncotree_code'"):
        stf.datasets.hest_metadata(hest_root, tumour="COAD")
    with pytest.raises(ValueError, match=r"No HEST sample matches organ='Lung'.*\['Bowel', 'Breast'\]"):
        stf.datasets.hest_metadata(hest_root, organ="Lung")
    with pytest.raises(KeyError, match="not in the metadata table.*NOPE"):
        stf.datasets.hest_metadata(hest_root, ids=["NOPE"])
    with pytest.raises(FileNotFoundError, match="HEST_v.*csv.*download=True.*huggingface.co/datasets/MahmoodLab/hest"):
        stf.datasets.hest_metadata(hest_root / "st")


def test_hest_cohort_reads_the_selected_samples(hest_root):
    slides = stf.datasets.hest(
        path=hest_root, organ="Bowel", species="Homo sapiens", oncotree_code=["COAD", "READ"],
        st_technology="Visium", progress=False,
    )
    assert [s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["slide_id"] for s in slides] == ["TENX1", "TENX2"]
    for s, patient in zip(slides, ["P1", "P2"], strict=True):
        t = s.tables[K.TABLE_KEY]
        meta = t.uns[K.SLIDE_META_KEY]
        assert meta["mpp"] == pytest.approx(MPP) and meta["patient_id"] == patient
        assert meta["organ"] == "Bowel" and meta["spot_diameter_um"] == 55.0
        assert t.n_obs == 16 and K.IMAGE_KEY in s.images
    # TENX2 has no per-sample json: its metadata came from the release table
    assert slides[1].tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["metadata_source"].endswith("HEST_v1_10_0.csv")
    # expression only
    (only,) = stf.datasets.hest("NCBI4", path=hest_root, load_image=False, progress=False)
    assert len(only.images) == 0 and only.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["patient_id"] == "P4"


def test_hest_cohort_from_a_dataframe(hest_root):
    table = pd.read_csv(hest_root / "HEST_v1_10_0.csv")
    (s,) = stf.datasets.hest(path=hest_root, metadata=table, ids="TENX2", progress=False)
    assert s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["mpp"] == pytest.approx(MPP)


def test_missing_samples_are_listed_before_anything_is_read(hest_root, tmp_path, monkeypatch):
    root = tmp_path / "partial"
    shutil.copytree(hest_root, root)
    (root / "wsis" / "TENX2.tif").unlink()
    calls = []
    monkeypatch.setattr(stf.io, "read_hest", lambda *a, **k: calls.append(k))
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 selected HEST samples.*TENX2: wsis/TENX2\.tif.*download=True.*HF_TOKEN"):
        stf.datasets.hest(path=root, organ="Bowel", st_technology="Visium", species="Homo sapiens", progress=False)
    assert calls == []


def test_download_fetches_only_missing_samples(hest_root, tmp_path, monkeypatch):
    """With download=True the missing samples come from the Hub (here a stand-in that copies the fixture)."""
    import huggingface_hub

    root = tmp_path / "local"
    root.mkdir()
    shutil.copy(hest_root / "HEST_v1_10_0.csv", root)
    for sub, name in (("st", "TENX1.h5ad"), ("wsis", "TENX1.tif"), ("metadata", "TENX1.json")):
        (root / sub).mkdir(exist_ok=True)
        shutil.copy(hest_root / sub / name, root / sub / name)
    asked = {}

    def fake_snapshot_download(repo_id, *, repo_type=None, local_dir=None, allow_patterns=None, **kw):
        asked.update(repo_id=repo_id, repo_type=repo_type, local_dir=Path(local_dir), patterns=sorted(allow_patterns))
        for pat in allow_patterns:
            src = hest_root / pat
            if src.is_file():
                (Path(local_dir) / pat).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, Path(local_dir) / pat)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    slides = stf.datasets.hest(path=root, organ="Bowel", oncotree_code="COAD", download=True, progress=False)
    assert asked["repo_id"] == "MahmoodLab/hest" and asked["repo_type"] == "dataset" and asked["local_dir"] == root
    assert asked["patterns"] == ["metadata/TENX5.json", "st/TENX5.h5ad", "wsis/TENX5.tif"]  # TENX1 was local
    assert [s.tables[K.TABLE_KEY].uns[K.SLIDE_META_KEY]["slide_id"] for s in slides] == ["TENX1", "TENX5"]


def test_gated_dataset_says_how_to_log_in(hest_root, tmp_path, monkeypatch):
    import huggingface_hub

    class GatedRepoError(Exception):  # same name as huggingface_hub.errors.GatedRepoError
        pass

    def refuse(*a, **k):
        raise GatedRepoError("401 Client Error: access to MahmoodLab/hest is restricted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    root = tmp_path / "empty"
    root.mkdir()
    shutil.copy(hest_root / "HEST_v1_10_0.csv", root)
    with pytest.raises(PermissionError, match=r"gated.*accept its terms.*huggingface-cli login.*HF_TOKEN"):
        stf.datasets.hest("TENX1", path=root, download=True, progress=False)
