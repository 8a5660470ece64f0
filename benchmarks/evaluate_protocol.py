"""Wall time of ``spasem evaluate`` on a cohort: cold run with 1 and N workers, a rerun with
nothing left to do, and a rerun that adds a fusion (registrations and features from the cache).

    python benchmarks/evaluate_protocol.py --phantoms 3             # generate 3 CT + 3 MR phantoms
    python benchmarks/evaluate_protocol.py --manifest cohort/manifest.json --workers 2

Prints one line per run: seconds, units run, and the peak memory of this process and its children.
Each run is a separate ``spasem evaluate`` process, so the figures include start-up.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(args: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "spasem.cli.main", "evaluate", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"spasem evaluate failed ({done.returncode}):\n{done.stderr}")
    summary = [line for line in done.stderr.splitlines() if "case(s):" in line]
    return seconds, summary[-1] if summary else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--manifest", type=Path, help="cohort manifest (CT and MR cases)")
    parser.add_argument("--phantoms", type=int, default=3, help="subjects to generate when no --manifest is given")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--organs", default="liver,left_kidney,right_kidney,spleen")
    parser.add_argument("--shots", default="1,2")
    parser.add_argument("--draws", default="2")
    parser.add_argument("--preset", default="basic")
    parser.add_argument("--set", dest="sets", action="append", default=["window.size=64", "window.spacing_mm=3"])
    parser.add_argument("--keep", type=Path, help="keep the outputs in this folder")
    opts = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spasem-bench-"))
    try:
        manifest = opts.manifest
        if manifest is None:
            from spasem.data.phantoms import write_cohort

            t0 = time.perf_counter()
            manifest = write_cohort(work / "cohort", opts.phantoms, modalities=("ct", "mr"))
            print(f"generated {opts.phantoms} CT + {opts.phantoms} MR phantoms in {time.perf_counter() - t0:.1f} s")
        common = ["--supports", str(manifest), "--support-modality", "CT", "--query-modality", "MR",
                  "--organs", opts.organs, "--shots", opts.shots, "--draws", opts.draws, "--preset", opts.preset]
        for item in opts.sets:
            common += ["--set", item]
        runs = [
            ("cold, 1 worker", work / "w1", ["--workers", "1", "--fusion", "entropy_gate,mean"]),
            (f"cold, {opts.workers} workers", work / "wn", ["--workers", str(opts.workers), "--fusion", "entropy_gate,mean"]),
            ("rerun, all finished", work / "wn", ["--workers", str(opts.workers), "--fusion", "entropy_gate,mean"]),
            ("rerun + fusion spatial_only (cache warm)", work / "wn",
             ["--workers", str(opts.workers), "--fusion", "entropy_gate,mean,spatial_only"]),
        ]
        for title, out, extra in runs:
            seconds, summary = run([*common, "--out", str(out), *extra])
            peak = max(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, 0) / 1024
            print(f"{title:42s} {seconds:7.1f} s   {summary}   (peak RSS of a child so far {peak:.0f} MiB)")
        print((work / "wn" / "table.md").read_text())
        if opts.keep:
            shutil.copytree(work / "wn", opts.keep, dirs_exist_ok=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
