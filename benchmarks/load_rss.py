"""Peak host memory of loading a Jodi DiT checkpoint, relative to the file size (target: <= 1.3).

Writes a random-weight bf16 checkpoint of a mid-size config to a temporary folder, then loads it in a fresh
subprocess through ``jodi_core.loading.load_jodi`` (meta-device construction, tensors assigned, no fp32 copy) and
reports the peak resident-set increase over the file size. Peak RSS counts file pages mapped in as well as private
memory, so a reader that keeps the mapping and copies out of it shows up here.

    python benchmarks/load_rss.py [--hidden 1152 --depth 8 --format safetensors|pth --keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO_ROOT))
TARGET = 1.3


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(path: str) -> None:
    """Runs in the subprocess: load the checkpoint and print the memory numbers as JSON."""
    import torch

    from jodi_core.loading import load_jodi

    torch.set_num_threads(1)
    try:  # reset the peak-RSS counter so that imports do not count (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    base_kb = _proc_status_kb("VmRSS")
    model = load_jodi(path)
    peak_kb = _proc_status_kb("VmHWM")
    after = {k: _proc_status_kb(k) for k in ("VmRSS", "RssAnon", "RssFile")}
    params = sum(p.numel() for p in model.parameters())
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    meta_left = [n for n, p in model.named_parameters() if p.is_meta]
    print(json.dumps(dict(base_kb=base_kb, peak_kb=peak_kb, after_kb=after, params=params, dtypes=dtypes,
                          meta_left=meta_left)))


def _write_checkpoint(path: Path, hidden: int, depth: int, fmt: str) -> int:
    import torch

    from jodi_core.loading import build_on_meta
    from jodi_core.dit.model import JodiConfig, JodiTransformer

    config = JodiConfig(hidden_size=hidden, depth=depth, num_heads=max(1, hidden // 72))
    model = build_on_meta(lambda: JodiTransformer(config))
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    return sum(v.numel() for v in sd.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1152)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--format", choices=("safetensors", "pth"), default="safetensors")
    parser.add_argument("--keep", action="store_true", help="keep the temporary checkpoint")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="jodi_load_rss_"))
    path = tmp / f"jodi_h{args.hidden}_d{args.depth}_bf16.{'safetensors' if args.format == 'safetensors' else 'pth'}"
    try:
        numel = _write_checkpoint(path, args.hidden, args.depth, args.format)
        size = path.stat().st_size
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        res = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                             env=env, cwd=str(REPO_ROOT))
        if res.returncode != 0:
            sys.stderr.write(res.stdout + res.stderr)
            return res.returncode
        stats = json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        if not args.keep:
            for p in tmp.iterdir():
                p.unlink()
            tmp.rmdir()

    increase = (stats["peak_kb"] - stats["base_kb"]) * 1024
    ratio = increase / size
    print(f"checkpoint: hidden {args.hidden}, depth {args.depth}, {numel / 1e6:.1f} M tensors elements, "
          f"{args.format}, {size / 2**20:.1f} MiB")
    print(f"loaded: {stats['params'] / 1e6:.1f} M parameters, dtypes {stats['dtypes']}, "
          f"still on meta: {len(stats['meta_left'])}")
    print(f"peak RSS increase: {increase / 2**20:.1f} MiB; after load: anon {stats['after_kb']['RssAnon'] / 1024:.1f} "
          f"MiB, file-backed {stats['after_kb']['RssFile'] / 1024:.1f} MiB")
    print(f"peak RSS increase / file size = {ratio:.3f} (target <= {TARGET})")
    return 0 if ratio <= TARGET and not stats["meta_left"] else 1


if __name__ == "__main__":
    sys.exit(main())
