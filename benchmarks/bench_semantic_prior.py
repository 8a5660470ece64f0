"""Time and peak memory of ``semantic_prior`` (streamed) vs ``semantic_prior_dense``.

Cases: query feature grids of 32^3 and 128^3 voxels x 512 and 20,000 prototypes, C = 384
channels, on CPU (and CUDA when available)::

    PYTHONPATH=$PWD python benchmarks/bench_semantic_prior.py            # all, a few minutes on 2 cores
    PYTHONPATH=$PWD python benchmarks/bench_semantic_prior.py --sizes 32 --prototypes 512
    PYTHONPATH=$PWD python benchmarks/bench_semantic_prior.py --full     # no extrapolation (128^3 x 20k: ~30 min on 2 cores)

How it measures (each case runs in its own fresh Python process):

* time: wall clock of one call after a small warm-up call (CUDA: synchronised);
* CPU memory: the call's *rise of the peak resident set* above the resident set just before
  it -- the kernel's peak counter (VmHWM) is reset after the inputs are made by writing 5 to
  /proc/self/clear_refs. This counts every allocation (torch, MKL workspaces, allocator slack),
  unlike tracemalloc, which does not see torch's allocator. Without clear_refs permission the
  child reports ``ru_maxrss`` minus the resident set before the call (an upper bound);
* CUDA memory: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.

Dense cases whose estimated memory (4 float32 ``[N_p x V]`` matrices, the measured footprint of
the reference) exceeds ``--dense-limit-gb`` (default: 60% of available memory) are skipped with
their estimate. Streamed cases with more than ``--max-pairs`` voxel-prototype pairs are timed on
a slab of the volume (``D x H x k``) and the time extrapolated linearly (the work is exactly
proportional to the number of voxels; the memory beyond inputs does not depend on it except for
the two ``[V]`` float outputs, 8 bytes per voxel), unless ``--full``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20


# ------------------------------------------------------------------------------------------
# child: one measurement
# ------------------------------------------------------------------------------------------
def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_child(args: argparse.Namespace) -> None:
    import resource

    import torch

    from spasem.core.priors import semantic_prior, semantic_prior_dense

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    shape = tuple(int(s) for s in args.shape.split(","))
    feats = torch.randn((args.channels, *shape), device=device)
    protos = torch.randn((args.num_prototypes, args.channels), device=device)
    kwargs = {}
    if args.method == "streamed" and args.memory_budget_mib is not None:
        kwargs["memory_budget"] = int(args.memory_budget_mib * MIB)
    fn = semantic_prior if args.method == "streamed" else semantic_prior_dense
    fn(feats[:, :2, :2, :2], protos[:16], **kwargs)  # warm-up: lazy initialisation, thread pools

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        try:
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # the peak resident set becomes the current one
            exact = True
        except OSError:
            exact = False
        base = _rss_mib("VmRSS")
    start = time.perf_counter()
    p_sim, entropy = fn(feats, protos, **kwargs)
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        rise = (torch.cuda.max_memory_allocated(device) - base) / MIB
        exact = True
    else:
        peak = _rss_mib("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        rise = peak - base
    print(json.dumps({
        "seconds": seconds,
        "rise_mib": rise,
        "exact_peak": exact,
        "inputs_mib": (feats.numel() + protos.numel()) * 4 / MIB,
        "finite": bool(torch.isfinite(p_sim).all() and torch.isfinite(entropy).all()),
        "threads": torch.get_num_threads(),
    }))


# ------------------------------------------------------------------------------------------
# parent: the table
# ------------------------------------------------------------------------------------------
def dense_bytes(voxels: int, num_prototypes: int) -> int:
    """Estimated peak of semantic_prior_dense beyond its inputs: 4 float32 [N_p x V] matrices."""
    return 4 * 4 * voxels * num_prototypes


def available_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def measure(shape, n_p, method, device, args) -> dict:
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--child",
        "--shape", ",".join(map(str, shape)), "--num-prototypes", str(n_p), "--channels", str(args.channels),
        "--method", method, "--device", device, "--threads", str(args.threads),
    ]
    if args.memory_budget_mib is not None:
        cmd += ["--memory-budget-mib", str(args.memory_budget_mib)]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": f"exit {out.returncode}: {last}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="32,128", help="cube sides of the query feature grid (comma list)")
    parser.add_argument("--prototypes", default="512,20000", help="prototype counts (comma list)")
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--methods", default="dense,streamed")
    parser.add_argument("--devices", default="cpu,cuda", help="cuda cases run only when CUDA is available")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    parser.add_argument("--memory-budget-mib", type=float, default=None, help="semantic_prior memory_budget (default: its own)")
    parser.add_argument("--dense-limit-gb", type=float, default=None, help="skip dense cases estimated above this (default: 60%% of available memory)")
    parser.add_argument("--max-pairs", type=float, default=1.5e9, help="streamed cases with more voxel x prototype pairs are timed on a slab")
    parser.add_argument("--full", action="store_true", help="never extrapolate from a slab")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    # child mode
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--num-prototypes", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--device", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads is None:
        args.threads = torch.get_num_threads()
    if args.child:
        run_child(args)
        return

    devices = [d for d in args.devices.split(",") if d == "cpu" or (d == "cuda" and torch.cuda.is_available())]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"semantic_prior benchmark: C={args.channels}, torch {torch.__version__}, {args.threads} thread(s), "
          f"{os.cpu_count()} CPU(s), load average {load:.1f}, devices {','.join(devices)}"
          + ("" if torch.cuda.is_available() else " (no CUDA device)"))
    header = f"{'voxels':>8} {'N_p':>6} {'method':>9} {'device':>6} {'time_s':>9} {'peak_rise':>10}  note"
    print(header)
    print("-" * len(header))
    for side in (int(s) for s in args.sizes.split(",")):
        voxels = side**3
        for n_p in (int(n) for n in args.prototypes.split(",")):
            for device in devices:
                for method in args.methods.split(","):
                    shape, note, factor = (side, side, side), "", 1.0
                    if method == "dense":
                        need = dense_bytes(voxels, n_p)
                        if device == "cuda":
                            limit = torch.cuda.get_device_properties(0).total_memory * 0.8
                        else:
                            limit = args.dense_limit_gb * 1e9 if args.dense_limit_gb else 0.6 * available_bytes()
                        if need > limit:
                            print(f"{side:>5}^3 {n_p:>6} {method:>9} {device:>6} {'skipped':>9} {'~' + fmt_bytes(need):>10}  "
                                  f"needs ~{fmt_bytes(need)} (4 x [N_p x V] float32 of {fmt_bytes(need / 4)}), over the "
                                  f"{fmt_bytes(limit)} limit")
                            continue
                    elif voxels * n_p > args.max_pairs and not args.full:
                        depth = max(1, int(args.max_pairs // (side * side * n_p)))
                        shape = (side, side, depth)
                        factor = side / depth
                        note = f"timed on a {side}x{side}x{depth} slab, time x{factor:g}; "
                    result = measure(shape, n_p, method, device, args)
                    if "error" in result:
                        print(f"{side:>5}^3 {n_p:>6} {method:>9} {device:>6} {'failed':>9} {'':>10}  {result['error']}")
                        continue
                    seconds = result["seconds"] * factor
                    rise = result["rise_mib"]
                    if factor != 1.0:
                        rise += 2 * 4 * voxels * (1 - 1 / factor) / MIB  # the full [V] outputs
                        note += "peak + full outputs; "
                    note += f"inputs {fmt_bytes(4 * args.channels * (voxels + n_p))}"
                    if not result["exact_peak"]:
                        note += "; peak from ru_maxrss (upper bound)"
                    if not result["finite"]:
                        note += "; NON-FINITE OUTPUT"
                    print(f"{side:>5}^3 {n_p:>6} {method:>9} {device:>6} {seconds:>9.2f} {rise:>7.0f} MiB  {note}", flush=True)


if __name__ == "__main__":
    main()
