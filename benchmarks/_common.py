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


def run_worker(script: str, args: list[str], *, src: str | None = None, timeout: float | None = None) -> dict:
    """Run ``python <script> --worker <args>`` in a fresh process; return the JSON of its last stdout line.

    ``src`` is put first on ``PYTHONPATH`` (the ``src`` folder of another checkout, e.g. the code
    before a change): before/after comparisons then run the same script against both versions.
    """
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, script, "--worker", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (src={src}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource
    import sys

    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def versions(current: str = "after", baseline_src: str | None = None) -> list[tuple[str, str | None]]:
    """``[(label, src)]``: this checkout, then the baseline checkout when given."""
    out: list[tuple[str, str | None]] = [(current, str(Path(__file__).resolve().parents[1] / "src"))]
    if baseline_src:
        if not Path(baseline_src, "spatialtranscriptformer").is_dir():
            raise SystemExit(f"--baseline-src {baseline_src}: no spatialtranscriptformer package there.")
        out.append(("before", str(baseline_src)))
    return out
