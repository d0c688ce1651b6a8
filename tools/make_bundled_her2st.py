"""Make the her2st section bundled in the package: C2 cropped to its spots (+ margin).

Run from the project root with the her2st data beside it::

    python tools/make_bundled_her2st.py ../shared/data/her2st/C2

Writes ``src/spatialtranscriptformer/datasets/data/her2st/C2/`` in the her2st layout, with pixel
coordinates shifted to the crop. Data: Andersson et al. 2021 (CC BY 4.0).
"""

import shutil
import sys
from pathlib import Path

import pandas as pd
from PIL import Image

MARGIN_PX = 300

src = Path(sys.argv[1])
dst = Path("src/spatialtranscriptformer/datasets/data/her2st/C2")
dst.mkdir(parents=True, exist_ok=True)
sel = pd.read_csv(src / "C2_selection.tsv", sep="\t")
counts_ids = pd.read_csv(src / "C2.tsv.gz", sep="\t", index_col=0, usecols=[0]).index
keep = [f"{x}x{y}" in set(counts_ids) for x, y in zip(sel.x, sel.y, strict=True)]
px, py = sel.loc[keep, "pixel_x"], sel.loc[keep, "pixel_y"]
Image.MAX_IMAGE_PIXELS = None
im = Image.open(next(src.glob("*.jpg")))
x0, y0 = max(0, int(px.min()) - MARGIN_PX), max(0, int(py.min()) - MARGIN_PX)
x1, y1 = min(im.width, int(px.max()) + MARGIN_PX), min(im.height, int(py.max()) + MARGIN_PX)
im.crop((x0, y0, x1, y1)).save(dst / "5714_HE_BT_C2.jpg", quality=70)
sel["pixel_x"] = sel["pixel_x"] - x0
sel["pixel_y"] = sel["pixel_y"] - y0
inside = (sel.pixel_x >= 0) & (sel.pixel_y >= 0) & (sel.pixel_x < x1 - x0) & (sel.pixel_y < y1 - y0)
sel[inside].to_csv(dst / "C2_selection.tsv", sep="\t", index=False)
shutil.copy(src / "C2.tsv.gz", dst / "C2.tsv.gz")
print(f"crop ({x0}, {y0}, {x1}, {y1}) -> {x1 - x0} x {y1 - y0} px")
