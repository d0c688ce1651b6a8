"""The tutorial notebooks: committed executed, and each one runs top to bottom without an error."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = [
    "01_quickstart.ipynb",
    "02_bring_your_own_data.ipynb",
    "03_benchmarking.ipynb",
    "04_superresolution.ipynb",
    "05_interpretability.ipynb",
]
MAX_BYTES = 1_500_000
QUIET = ["01_quickstart.ipynb", "03_benchmarking.ipynb", "04_superresolution.ipynb", "05_interpretability.ipynb"]
"""Notebooks whose fresh run must print nothing on stderr: no warning, no log record, from any library (02 shows
the warnings a user's Visium folder gives on purpose: a blank hires PNG, scanpy's reader notice)."""
WARNING_LINE = re.compile(r"\b[A-Z]\w*Warning\b:|\.py:\d+: ")


def test_every_tutorial_is_listed():
    assert sorted(p.name for p in TUTORIALS.glob("*.ipynb")) == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_executed(name):
    path = TUTORIALS / name
    assert path.stat().st_size < MAX_BYTES, f"{name} is {path.stat().st_size} bytes"
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code, f"{name} has no code cell"
    counts = [c["execution_count"] for c in code]
    assert all(isinstance(n, int) for n in counts), f"{name}: unexecuted cells"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{name}: not run top to bottom"
    for c in code:
        assert not any(o.get("output_type") == "error" for o in c["outputs"]), f"{name}: a cell raised"
    assert any(o.get("output_type") == "display_data" for c in code for o in c["outputs"]), f"{name}: no figure"
    # exactly one top-level title (the docs page title)
    titles = [
        line
        for c in nb["cells"]
        if c["cell_type"] == "markdown"
        for line in "".join(c["source"]).splitlines()
        if line.startswith("# ")
    ]
    assert len(titles) == 1, f"{name}: top-level titles {titles}"


def _kernel_manager_class():
    """A kernel manager that starts the kernel in this interpreter (the one with the package installed)."""
    from jupyter_client.manager import KernelManager

    class HereKernelManager(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file, *(extra_arguments or [])]

    return HereKernelManager


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")

    monkeypatch.setenv("STF_CACHE_DIR", str(tmp_path / "cache"))  # the kernel inherits it: caches stay in tmp
    nb = nbformat.read(TUTORIALS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        kernel_manager_class=_kernel_manager_class(),
        timeout=600,
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    client.execute()  # raises CellExecutionError when a cell fails
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    streams = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"]
    warned = [line for o in streams for line in o.text.splitlines() if WARNING_LINE.search(line)]
    if name in QUIET:  # a fresh kernel shows no warning from our stack (or any other)
        stderr = [o.text for o in streams if o.name == "stderr"]
        assert not warned and not stderr, f"{name} printed warnings / stderr: {warned or stderr}"
