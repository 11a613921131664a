"""DC-AE f32c32 speed and memory: whole-image vs tiled encode/decode, and 8 domains decoded in one batch.

Random weights with the real sana-1.0 shapes (the numbers depend on shapes, not on values; the tiled-vs-whole
difference printed here is only a sanity check, since a random model's global attention is far from a trained one's).

  python benchmarks/dcae_tiling.py                                   # CPU, tiny config, small sizes
  python benchmarks/dcae_tiling.py --device cuda --dtype bf16 --config real --sizes 1024 2048 4096
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from jodi_core.dcae.model import (  # noqa: E402
    DC_AE_F32C32_SANA_1_0,
    DCAE,
    DEFAULT_TILE_OVERLAP,
    DEFAULT_TILE_SIZE,
    DCAEConfig,
)

TINY = DCAEConfig(width_list=(8, 16, 32, 32, 32, 64), encoder_depth_list=(1,) * 6, decoder_depth_list=(1,) * 6)
CONFIGS = {"tiny": TINY, "real": DC_AE_F32C32_SANA_1_0}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build(cfg: DCAEConfig, device, dtype, seed: int = 0) -> DCAE:
    torch.manual_seed(seed)
    model = DCAE(cfg, dtype=dtype, device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(math.prod(p.shape[1:])))
            elif "norm" not in name:
                p.normal_(0.0, 0.02)
    return model.eval().requires_grad_(False)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device, repeats: int) -> dict:
    """Best-of-``repeats`` seconds and the peak memory above what was allocated before (CUDA only)."""
    cuda = torch.device(device).type == "cuda"
    try:
        fn()  # warm-up (cuDNN algorithm choice, allocator)
        sync(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            best = min(best, time.perf_counter() - t0)
        res = {"seconds": round(best, 4)}
        if cuda:
            res["peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 2)
        return res | {"out": out}
    except torch.OutOfMemoryError:
        if cuda:
            torch.cuda.empty_cache()
        return {"seconds": None, "oom": True, "out": None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=DTYPES)
    p.add_argument("--config", default="tiny", choices=CONFIGS)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--tile", type=int, default=None, help=f"tile size in pixels (default {DEFAULT_TILE_SIZE})")
    p.add_argument("--overlap", type=int, default=None, help=f"overlap in pixels (default {DEFAULT_TILE_OVERLAP})")
    p.add_argument("--batch8-size", type=int, default=None, help="also decode 8 domains at this size, batched/looped")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights and inputs")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = p.parse_args(argv)

    dtype = DTYPES[args.dtype]
    model = build(CONFIGS[args.config], args.device, dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    tile = args.tile or (DEFAULT_TILE_SIZE if args.config == "real" else 128)
    overlap = args.overlap if args.overlap is not None else (DEFAULT_TILE_OVERLAP if args.config == "real" else 64)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    info = {"device": str(args.device), "dtype": args.dtype, "config": args.config,
            "weights_gib": round(weights_gib, 3),
            "tile": tile, "overlap": overlap, "channels_last": args.channels_last, "torch": torch.__version__}
    if torch.device(args.device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(info))
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    with torch.inference_mode():
        for size in args.sizes:
            img = (torch.rand(1, 3, size, size, generator=g) * 2 - 1).to(args.device, dtype, memory_format=fmt)
            lat = torch.randn(1, model.latent_channels, size // 32, size // 32, generator=g)
            lat = lat.to(args.device, dtype, memory_format=fmt)
            for op, x in (("encode", img), ("decode", lat)):
                fn = getattr(model, op)
                whole = measure(lambda: fn(x), args.device, args.repeats)
                tiled = measure(lambda: fn(x, tile_size=tile, overlap=overlap), args.device, args.repeats)
                row = {"op": op, "size": size, "whole": {k: v for k, v in whole.items() if k != "out"},
                       "tiled": {k: v for k, v in tiled.items() if k != "out"}}
                if whole["out"] is not None and tiled["out"] is not None:
                    row["max_abs_diff_random_weights"] = round((whole["out"] - tiled["out"]).abs().max().item(), 4)
                print(json.dumps(row))
                rows.append(row)
                del whole, tiled
        if args.batch8_size:
            s = args.batch8_size
            lat8 = torch.randn(8, model.latent_channels, s // 32, s // 32, generator=g)
            lat8 = lat8.to(args.device, dtype, memory_format=fmt)
            batched = measure(lambda: model.decode(lat8), args.device, args.repeats)
            looped = measure(lambda: torch.cat([model.decode(lat8[i : i + 1]) for i in range(8)]), args.device,
                             args.repeats)
            row = {"op": "decode_8_domains", "size": s, "batched": {k: v for k, v in batched.items() if k != "out"},
                   "looped": {k: v for k, v in looped.items() if k != "out"}}
            print(json.dumps(row))
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
