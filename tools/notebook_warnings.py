"""Run a tutorial notebook in a fresh kernel and count the warnings in its outputs.

Usage::

    python tools/notebook_warnings.py tutorials/01_quickstart.ipynb [--strip-filters] [--progress]

The kernel is this interpreter (with the current environment, e.g. ``PYTHONPATH``). A warning is a
line in a stream output (stdout or stderr) that looks like ``...SomethingWarning: message`` (what
:func:`warnings.showwarning` prints), or a log record printed at WARNING level or above by Python's
last-resort handler (a bare stderr line is counted separately as "other stderr"). ``--strip-filters``
removes ``warnings.filterwarnings`` / ``warnings.formatwarning`` lines from the notebook before running
it (what the user sees without the tutorial's filters). ``--progress`` turns
``stf.settings.progress = False`` into ``True``.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

WARNING_RE = re.compile(r"\b[A-Z]\w*Warning\b:|\.py:\d+: ")


def _kernel_manager_class():
    from jupyter_client.manager import KernelManager

    class HereKernelManager(KernelManager):
        def format_kernel_cmd(self, extra_arguments=None):
            return [sys.executable, "-m", "ipykernel_launcher", "-f", self.connection_file, *(extra_arguments or [])]

    return HereKernelManager


def run(path: Path, *, strip_filters: bool = False, progress: bool = False, timeout: int = 1200):
    """Execute the notebook; return ``(warnings, other_stderr)`` lists of (cell index, text)."""
    import nbclient
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        if strip_filters:
            cell.source = "\n".join(
                line for line in cell.source.splitlines()
                if not re.match(r"\s*warnings\.(filterwarnings|formatwarning|simplefilter)", line)
            )
        if progress:
            cell.source = cell.source.replace("stf.settings.progress = False", "stf.settings.progress = True")
    with tempfile.TemporaryDirectory() as cache:
        import os

        os.environ["STF_CACHE_DIR"] = cache
        client = nbclient.NotebookClient(
            nb, kernel_name="python3", kernel_manager_class=_kernel_manager_class(), timeout=timeout,
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    found, other = [], []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        for out in cell.outputs:
            if out.output_type != "stream":
                continue
            for line in out.text.splitlines():
                if WARNING_RE.search(line):
                    found.append((i, line.strip()))
                elif out.name == "stderr" and line.strip():
                    other.append((i, line.strip()))
    return found, other


def main() -> None:
    """Run the notebook given on the command line and print its warnings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook", type=Path)
    ap.add_argument("--strip-filters", action="store_true")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    found, other = run(args.notebook, strip_filters=args.strip_filters, progress=args.progress)
    for i, line in found:
        print(f"cell {i}: {line[:300]}")
    for i, line in other:
        print(f"cell {i} (other stderr): {line[:300]}")
    print(f"{args.notebook.name}: {len(found)} warning(s), {len(other)} other stderr line(s)")


if __name__ == "__main__":
    main()
