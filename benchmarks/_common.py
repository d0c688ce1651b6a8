"""Shared helpers of the benchmark scripts."""

from __future__ import annotations

from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, text: str) -> Path:
    """Write a Markdown result table to ``benchmarks/results/<name>.md`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    print(text)
    return path


def her2st_section(section: str = "C3"):
    """A full her2st section from ../shared/data, else the bundled (cropped) one."""
    import spatialtranscriptformer as stf

    folder = SHARED / "her2st"
    if (folder / section).is_dir():
        return stf.datasets.her2st(section, path=folder)
    return stf.datasets.her2st()
