"""Throughput of the synthetic world at 64x64: scenes per second on N worker processes.

    python benchmarks/synthetic_speed.py [--workers 2] [--scenes 600] [--size 64] [--min-rate 200]

Reports (1) the single-process rate in CPU time, which does not depend on what else the machine runs, (2) the
projected N-core rate from it, and (3) the measured wall-clock rate of a DataLoader with N workers. Exits 1 when the
wall-clock rate is below ``--min-rate`` (the requirement: >= 200 scenes/s at 64x64 on 2 cores); the CPU-time numbers
tell whether a miss comes from a busy machine or from the generator.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from jodi_core.data.synthetic import SyntheticConfig, SyntheticDataset, SyntheticWorld  # noqa: E402


def _collate_count(items):
    return len(items)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--scenes", type=int, default=600)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--min-rate", type=float, default=200.0)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    cfg = SyntheticConfig(height=args.size, width=args.size, seed=123)

    world = SyntheticWorld(cfg)
    world[0]  # warm-up (palette, imports)
    n_single = max(args.scenes // 3, 50)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(n_single):
        world[i]
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    per_cpu = n_single / cpu
    print(f"single process: {per_cpu:.0f} scenes per CPU-second ({1e3 / per_cpu:.2f} ms/scene), "
          f"{n_single / wall:.0f} scenes/s wall")
    print(f"projected on {args.workers} cores: {per_cpu * args.workers:.0f} scenes/s")

    ds = SyntheticDataset(cfg, start=10_000, length=args.scenes)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=args.workers, collate_fn=_collate_count,
                                         persistent_workers=False)
    it = iter(loader)
    count = next(it)  # worker start-up is not generation time
    t0 = time.perf_counter()
    for n in it:
        count += n
    wall = time.perf_counter() - t0
    rate = (count - 16) / wall
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"DataLoader, {args.workers} workers: {rate:.0f} scenes/s wall (load average {load:.1f})")
    if rate < args.min_rate:
        print(f"FAIL: {rate:.0f} < {args.min_rate:.0f} scenes/s")
        return 1
    print(f"OK: {rate / args.min_rate:.2f}x the required {args.min_rate:.0f} scenes/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
