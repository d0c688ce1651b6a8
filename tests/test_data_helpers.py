import numpy as np
import pytest

import spatialtranscriptformer as stf
from spatialtranscriptformer._data import as_slide_list, get_table


def test_table_resolution_lists_available_tables(bundled_sdata):
    import spatialdata as sd

    s = sd.deepcopy(bundled_sdata)
    assert get_table(s) is s.tables["table"]
    s.tables["other"] = s.tables["table"].copy()
    assert get_table(s, "other") is s.tables["other"]
    with pytest.raises(KeyError, match=r"Table 'nope' not found.*\['table', 'other'\]"):
        get_table(s, "nope")
    del s.tables["table"]
    s.tables["third"] = s.tables["other"].copy()
    with pytest.raises(KeyError, match="several tables"):
        get_table(s)
    empty = sd.SpatialData(images={"he": s.images["he"]})
    with pytest.raises(ValueError, match="no table"):
        get_table(empty)
    with pytest.raises(TypeError, match="AnnData or a SpatialData"):
        get_table(np.zeros(3))


def test_slide_lists():
    with pytest.raises(ValueError, match="empty list"):
        as_slide_list([])
    with pytest.raises(TypeError, match="Slide 1"):
        as_slide_list([stf.datasets.her2st(load_image=False), 3])


def test_missing_image_is_a_clear_error():
    s = stf.datasets.her2st(load_image=False)
    with pytest.raises(KeyError, match="available images: none"):
        stf.pp.tiles(s, image_key="he")


def test_settings_and_cheap_import(tmp_path, monkeypatch):
    import subprocess
    import sys

    code = "import sys, spatialtranscriptformer as stf; print(any(m in sys.modules for m in ('torch', 'lightning', 'timm')))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    monkeypatch.setenv("STF_DATA_DIR", str(tmp_path))
    assert stf.settings.data_dir == tmp_path
    stf.settings.data_dir = tmp_path / "x"
    assert stf.settings.data_dir == tmp_path / "x"
    stf.settings.data_dir = None
    stf.settings.verbosity = "INFO"
    assert stf.settings.verbosity == 20
    stf.settings.verbosity = "WARNING"
    assert str(stf.settings.torch_device("cpu")) == "cpu"
    assert "Settings(" in repr(stf.settings)


def test_her2st_sections_from_a_local_folder(her2st_dir, tmp_path):
    s = stf.datasets.her2st("C3", path=her2st_dir, load_image=False)
    t = s.tables["table"]
    assert t.n_obs == 180 and t.obs["patient_id"].iloc[0] == "C" and abs(t.uns["stf_slide"]["mpp"] - 0.69) < 0.02
    with pytest.raises(FileNotFoundError, match="C9.*not found locally"):
        stf.datasets.her2st("C9", path=tmp_path)
