"""Post-processing memory at 4096 x 4096: a few copies of the output image, not hundreds of bytes per pixel.

Measured in a fresh process (torch's CPU allocations are invisible to tracemalloc): resident memory after the input
exists, then the peak (``VmHWM``) after the pipeline's post-processing of decoded maps at the output size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SIDE = 4096

_MEASURE = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
from jodi_core.pipeline import JodiPipeline

side, domains = int(sys.argv[2]), json.loads(sys.argv[3])


class Decoded(torch.nn.Module):
    # Stands in for the DC-AE: each decode returns a fresh map at the output size, as decode + resize do.
    spatial_compression = 32

    def __init__(self, image):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.image = image

    def decode(self, z):
        return self.image.clone()


def status_kib(field):
    # VmHWM is this address space's own peak. ru_maxrss is not: Linux carries it across exec, so a child of a
    # large pytest process starts with its parent's resident size as its "peak".
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


roles = torch.zeros(1, 8, dtype=torch.long)
small = JodiPipeline(None, Decoded(torch.zeros(1, 3, 64, 64)))
small.decode_latents(torch.zeros(1, 8, 4, 2, 2), roles, 64, 64, domains=domains)  # warm-up: palettes, threads
image = torch.empty(1, 3, side, side).uniform_(-1, 1)  # in place: no temporary before the baseline
pipe = JodiPipeline(None, Decoded(image))
base = status_kib("VmRSS")
images, seg = pipe.decode_latents(torch.zeros(1, 8, 4, 2, 2), roles, side, side, domains=domains)
peak = status_kib("VmHWM")
kept = sum(t.numel() * t.element_size() for t in images.values())
kept += 0 if seg is None else seg.numel() * seg.element_size()
print(json.dumps({"extra": peak - base, "kept": kept, "map": image.numel() * image.element_size()}))
"""


# glibc's dynamic mmap threshold lets freed temporaries of up to 32 MiB stay in per-thread heaps, so the peak RSS
# then depends on the machine's thread count and history. A fixed threshold returns every large temporary at once:
# the peak is what the code holds, not what malloc keeps.
_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}


def measure(domains: list[int], side: int = SIDE, repo: Path = REPO) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(repo), str(side), json.dumps(domains)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, **_ALLOCATOR})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads resident memory from /proc (Linux)")
@pytest.mark.parametrize("domains", [[6], list(range(8))], ids=["segmentation", "all-eight"])
def test_postprocessing_at_4096_needs_a_few_copies_of_the_output(domains):
    m = measure(domains)
    per_pixel = m["extra"] / SIDE**2
    # Beyond the maps it returns (float32 RGB each, plus the int64 class map), at most three more output maps
    # (36 bytes per pixel) while it works; a whole-image nearest-colour search took 288 bytes per pixel, twice.
    bound = m["kept"] + 3 * m["map"]
    assert m["extra"] <= bound, (f"post-processing peaked {m['extra'] / 2**20:.0f} MiB above its input "
                                 f"({per_pixel:.0f} bytes per output pixel), bound {bound / 2**20:.0f} MiB")
