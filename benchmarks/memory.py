"""Peak memory of Jodi (DiT step, 8-domain DC-AE decode) and Janus-Pro-7B decoding, bf16 vs fp8 weights (issue 17).

Every model is built on the meta device from the real configs in jodi_core (``JODI_1600M_P1_D20``,
``DC_AE_F32C32_SANA_1_0``, ``JANUS_PRO_7B``) and materialised tensor by tensor with random weights, so nothing is
downloaded and no second copy of the weights is ever made. ``fp8`` is ``weight_dtype="fp8_e4m3fn"`` as the loaders
apply it (the Linear and Conv2d weights that :func:`jodi_core.fp8.fp8_layers` picks stored in fp8, the rest in the
compute dtype, :class:`jodi_core.ops.CastOps` casting on use); ``bf16`` is ``weight_dtype="default"`` in bf16.

Each row prints a measured peak next to one computed from shapes:

- computed weights: parameter counts times bytes per dtype, on the meta model;
- computed activations: the estimates the nodes give ComfyUI (``JodiPipeline.memory_needs`` for the DiT step and the
  decode, ``JanusModel.kv_cache_bytes`` for Janus), so the ratio column is the accuracy of those estimates;
- fp8 cast: the compute-dtype copy of the largest fp8 weight that a cast-on-use layer makes while it runs (CastOps:
  ``weight.to(dtype)``, scaled in place by the per-tensor scale); the estimates above include it
  (``jodi_core.ops.cast_workspace_bytes``, computed on a meta model whose fp8 weights are stored in fp8, as loaded);
  listed on its own rows too.

``--device cuda`` measures everything at the real sizes with ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (peak over what was allocated before: activations; weights: allocated after building).
On the CPU (default) it measures the resident set (RSS, /proc/self/status VmRSS/VmHWM with the peak reset through
/proc/self/clear_refs) of fresh processes whose glibc returns every block of 64 KiB or more to the system on free:

- weights at the real shapes (DiT, DC-AE); Janus-Pro-7B in bf16 (14 GB) does not fit a small machine, so it is
  measured with 1 and 3 language-model layers (everything else at full size) and extrapolated to 30 layers;
- activations at 256-512 px with the blocks cut to 1 per stage (the peak is reached inside one block, whatever the
  depth; the DiT's per-block caption K/V, kept for the whole run, is added back for the 19 missing blocks from its
  measured size), and Janus with one layer, the real vocabulary (its token table a broadcast row: lookups only) and
  the static KV cache of prompt + 512 tokens allocated up front (so the peak comes with the prefill and the first
  step, which is all that is run).
  CPUs without bf16 matmuls run bf16 at ~0.1 GFLOP/s, so the CPU activation runs compute in fp32 (``fp32``, and
  ``fp8/fp32``: fp8 storage cast to fp32); the estimates are computed for the same dtype.

    python benchmarks/memory.py                          # CPU: ~5 minutes on 2 busy cores, < 5 GB RSS
    python benchmarks/memory.py --device cuda --json memory_cuda.json
    python benchmarks/memory.py --quick                  # CI smoke: tiny models and sizes, seconds

The issue's goals are checked at the end: Jodi at 1024 px with 8 domains (CFG) within 12 GB, Janus-Pro-7B in fp8
within 12 GB, and both within 8 GB in low-VRAM mode (weights streamed one unit at a time: peak = the largest unit, a
DiT block, a DC-AE block or a Janus layer/embedding/head, plus the activations with the fp8 cast). GB there means
GiB (a "12 GB" card has 12 GiB); CUDA's own context (a few hundred MiB) is not counted by either method.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from jodi_core import fp8, ops  # noqa: E402
from jodi_core.dcae.model import DC_AE_F32C32_SANA_1_0, DCAE, DCAEConfig  # noqa: E402
from jodi_core.dit.model import JODI_1600M_P1_D20, JodiConfig, JodiTransformer  # noqa: E402
from jodi_core.domains import NUM_DOMAINS, joint_roles, plan_roles  # noqa: E402
from jodi_core.janus.config import JANUS_PRO_7B, JanusConfig, LlamaConfig, SigLIPConfig, VQConfig  # noqa: E402
from jodi_core.janus.model import JanusModel  # noqa: E402
from jodi_core.pipeline import JodiPipeline  # noqa: E402

GiB = 2**30
GOAL_GIB = 12.0
LOW_VRAM_GOAL_GIB = 8.0
WEIGHT_DTYPES = {"bf16": "default", "fp8": "fp8_e4m3fn"}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
WHAT = {"dit": "Jodi DiT", "dcae": "DC-AE", "janus": "Janus"}  # the names fp8.fp8_layers keeps layers by
JANUS_PROMPT = 640  # an understanding prompt: 576 image tokens + a question
JANUS_NEW = 512
TEXT_DECODE_UNUSED = ("vision_model", "aligner", "gen_vision_model", "gen_aligner", "gen_head")
CAPTION_SCALE = 0.1  # random caption embeddings of about a Gemma output's size

# Small configs of the same structure for --quick (real configs are still used for every computed number at 1024 px).
TINY = {
    "dit": JodiConfig(hidden_size=64, depth=2, num_heads=2, caption_channels=32),
    "dcae": DCAEConfig(width_list=(8, 16, 32, 32, 32, 64), encoder_depth_list=(1,) * 6, decoder_depth_list=(1,) * 6),
    "janus": JanusConfig(
        vision=SigLIPConfig(image_size=32, patch_size=16, width=32, depth=1, num_heads=2, mlp_hidden=64),
        language=LlamaConfig(vocab_size=1024, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4,
                             num_kv_heads=4, max_position_embeddings=512),
        vq=VQConfig(codebook_size=64, codebook_dim=8, z_channels=32, base_channels=32, channel_mult=(1, 2),
                    num_res_blocks=1),
        gen_head_hidden=64, gen_grid=2),
}
REAL = {"dit": JODI_1600M_P1_D20, "dcae": DC_AE_F32C32_SANA_1_0, "janus": JANUS_PRO_7B}


# ---------------------------------------------------------------------------------------------------------------------
# Configs and models
# ---------------------------------------------------------------------------------------------------------------------


def make_config(kind: str, quick: bool, layers: Optional[int] = None):
    """The config of a case: real (or tiny with --quick), with the blocks cut to ``layers`` (DiT blocks, DC-AE
    decoder blocks per stage, Janus LM layers) when given."""
    cfg = (TINY if quick else REAL)[kind]
    if layers is None:
        return cfg
    if kind == "dit":
        return dataclasses.replace(cfg, depth=layers)
    if kind == "dcae":
        return dataclasses.replace(cfg, decoder_depth_list=(layers,) * len(cfg.width_list))
    return dataclasses.replace(cfg, language=dataclasses.replace(cfg.language, num_layers=layers))


def build_meta(kind: str, cfg, weight_dtype: str, dtype: torch.dtype) -> nn.Module:
    """The model as a loader builds it before assigning weights: on meta, CastOps layers for an fp8 weight_dtype."""
    operations = fp8.operations_for(weight_dtype)
    with torch.device("meta"):
        if kind == "dit":
            model = JodiTransformer(cfg, dtype=dtype, operations=operations)
        elif kind == "dcae":
            model = DCAE(cfg, dtype=dtype, operations=operations)
        else:
            model = JanusModel(cfg, dtype=dtype, operations=operations or nn)
    return model.eval().requires_grad_(False)


_META_CACHE: dict[tuple, nn.Module] = {}


def meta_model(kind: str, cfg, weight_dtype: str, dtype: torch.dtype) -> nn.Module:
    """:func:`build_meta`, built once per config (for shapes only: never materialise what this returns)."""
    key = (kind, repr(cfg), weight_dtype, dtype)
    if key not in _META_CACHE:
        _META_CACHE[key] = build_meta(kind, cfg, weight_dtype, dtype)
    return _META_CACHE[key]


class _Filler:
    """Random tensors made fast: a fixed pool of normal samples, scaled per tensor and repeated (numbers drawn one
    by one would take a minute per billion parameters on a small CPU; memory does not depend on the values)."""

    SIZE = 1 << 20

    def __init__(self, device: torch.device, seed: int = 0):
        self.pool = torch.randn(self.SIZE, generator=torch.Generator().manual_seed(seed)).to(device)
        self.offset = 0

    def tensor(self, shape, dtype: torch.dtype, std: float, mean: float, device) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        flat = out.view(-1)
        n = flat.numel()
        k = min(n, self.SIZE // 2)
        self.offset = (self.offset + 7919) % (self.SIZE - k + 1)  # another stretch of the pool for each tensor
        piece = self.pool[self.offset : self.offset + k] * std + mean
        if ops.is_fp8(dtype):
            fmax = torch.finfo(dtype).max
            piece = piece.clamp_(-fmax, fmax)
        piece = piece.to(dtype)
        full = n // k * k
        flat[:full].view(-1, k).copy_(piece.expand(n // k, k))  # one copy: a loop over slices is 10x slower
        flat[full:].copy_(piece[: n - full])
        return out


def materialize(model: nn.Module, what: str, weight_dtype: str, device, filler: _Filler,
                skip: tuple[str, ...] = ()) -> nn.Module:
    """Give every meta parameter a random tensor on ``device``, in the dtype the loader would store it in (fp8 for
    :func:`fp8.fp8_layers` under an fp8 ``weight_dtype``, with CastOps' per-tensor scale); one tensor at a time, so
    the peak is the weights plus one small piece. Parameters under ``skip`` prefixes stay on meta (unused parts)."""
    storage = ops.storage_dtype(weight_dtype)
    fp8_keys = set(fp8.fp8_layers(model, what)) if storage is not None else set()
    for mname, module in model.named_modules():
        if skip and mname.startswith(skip):
            continue
        for pname, p in list(module._parameters.items()):
            if p is None or not p.is_meta:
                continue
            key = f"{mname}.{pname}" if mname else pname
            if p.dim() >= 2:
                std, mean = 1.0 / math.sqrt(math.prod(p.shape[1:])), 0.0
            elif pname == "weight":  # norms
                std, mean = 0.0, 1.0
            else:
                std, mean = 0.02, 0.0
            dtype = storage if key in fp8_keys else p.dtype
            module._parameters[pname] = nn.Parameter(filler.tensor(p.shape, dtype, std, mean, device),
                                                     requires_grad=False)
            if key in fp8_keys and "scale_weight" in module._buffers:
                module._buffers["scale_weight"] = torch.ones((), dtype=torch.float32, device=device)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.is_meta:
                module._buffers[bname] = torch.zeros(b.shape, dtype=b.dtype, device=device)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# Shapes: weight bytes, streaming units, estimates
# ---------------------------------------------------------------------------------------------------------------------


def weight_table(model: nn.Module) -> dict[str, int]:
    """Parameter name -> bytes stored, on a :func:`stored_meta` model: an fp8 weight takes a byte per value plus its
    CastOps layer's per-tensor float32 scale."""
    return {name: p.numel() * p.element_size() + 4 * ops.is_fp8(p.dtype) for name, p in model.named_parameters()}


def total_bytes(table: dict[str, int], prefix: str = "") -> int:
    return sum(v for k, v in table.items() if _under(k, prefix))


def _under(key: str, prefix: str) -> bool:
    return not prefix or key == prefix or key.startswith(prefix + ".")


# Modules streamed as one unit in low-VRAM mode; elsewhere each leaf layer is its own unit.
_BLOCKS = ("JodiBlock", "LlamaDecoderLayer", "ResidualBlock", "EfficientViTBlock", "Block")


def streaming_units(model: nn.Module, prefix: str = "") -> list[str]:
    """Names of the units weights are streamed in: the repeated blocks, and every other layer on its own."""
    units: list[str] = []

    def visit(name: str, module: nn.Module) -> None:
        children = list(module.named_children())
        if type(module).__name__ in _BLOCKS or not children:
            if any(True for _ in module.parameters()):
                units.append(name)
            return
        units.extend(f"{name}.{n}" if name else n for n, _ in module.named_parameters(recurse=False))
        for n, child in children:
            visit(f"{name}.{n}" if name else n, child)

    root = model.get_submodule(prefix) if prefix else model
    visit(prefix, root)
    return units


def largest_unit(model: nn.Module, table: dict[str, int], prefix: str = "") -> tuple[str, int]:
    """(name, bytes) of the streamed unit with the largest stored weights (the estimates hold the fp8 cast copy)."""
    best = ("", 0)
    for unit in streaming_units(model, prefix):
        need = total_bytes(table, unit)
        if need > best[1]:
            best = (unit, need)
    return best


def stored_meta(kind: str, cfg, wd: str, dtype: torch.dtype) -> nn.Module:
    """The meta model with the weights an fp8 ``wd`` stores in fp8 in that dtype, as the loaders leave it."""
    key = (kind, repr(cfg), wd, dtype, "stored")
    if key not in _META_CACHE:
        model = build_meta(kind, cfg, WEIGHT_DTYPES[wd], dtype)
        storage = ops.storage_dtype(WEIGHT_DTYPES[wd])
        for name in fp8.fp8_layers(model, WHAT[kind]) if storage is not None else ():
            p = model.get_parameter(name)
            p.data = torch.empty(p.shape, dtype=storage, device="meta")
        _META_CACHE[key] = model
    return _META_CACHE[key]


def dit_step_estimate(cfg: JodiConfig, wd: str, dtype: torch.dtype, size: int, use_cfg: bool = True) -> int:
    """``JodiPipeline.memory_needs`` for one joint-generation step (8 domains) at ``size`` px, on the DiT's device."""
    gpu = torch.device("cuda")  # a device name only: the DiT's share, apart from what the host keeps
    pipe = JodiPipeline(stored_meta("dit", cfg, wd, dtype), None)
    plan = plan_roles(joint_roles(), 1, has_prompt=use_cfg, cfg_scale=4.5 if use_cfg else 1.0)
    return pipe.memory_needs(1, plan, size, size, use_cfg, decode=False, snap=False, dit_device=gpu,
                             vae_device=gpu)[gpu]


def decode_estimate(cfg: DCAEConfig, wd: str, dtype: torch.dtype, size: int, tile: Optional[int], maps: int) -> int:
    """``JodiPipeline.memory_needs`` of decoding ``maps`` domains of one sample at ``size`` px, on the DC-AE's device
    (one map at a time, as the pipeline and the nodes decode)."""
    gpu = torch.device("cuda")
    pipe = JodiPipeline(None, stored_meta("dcae", cfg, wd, dtype))
    plan = plan_roles(joint_roles(), 1)
    return pipe.memory_needs(1, plan, size, size, False, decode=True, encode=False, decode_rows=1,
                             decoded=list(range(maps)), vae_device=gpu, work_size=(size, size),
                             tiled_decode=tile is not None, tile_size=tile)[gpu]


def janus_estimate(cfg: JanusConfig, wd: str, dtype: torch.dtype, prompt: int, new: int) -> int:
    """What the Janus nodes reserve for a run (``nodes/janus._ready``): ``JanusModel.kv_cache_bytes`` of batch 1 over
    prompt + new tokens, and the cast copy of the largest fp8 weight."""
    model = stored_meta("janus", cfg, wd, dtype)
    return model.kv_cache_bytes(1, prompt + new) + ops.cast_workspace_bytes(model)


# ---------------------------------------------------------------------------------------------------------------------
# Measuring (runs in a child process: one per model kind)
# ---------------------------------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


class Meter:
    """Current and peak memory of one device: CUDA allocator counters, or this process's RSS on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        return _status_bytes("VmRSS")

    def reset(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            return
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")

    def peak(self) -> int:
        """Peak since :meth:`reset`. The kernel's RSS counters lag by up to a few hundred KiB per thread, so on the
        CPU a peak is good to about 1 MiB (and may read a little below the RSS at the reset)."""
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")

    def measure(self, fn: Callable[[], object]) -> tuple[object, int, float]:
        """(fn's result, peak bytes over what was in use before, seconds)."""
        self.reset()
        base = self.now()
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize()
        return out, max(0, self.peak() - base), time.perf_counter() - t0


def _weights_case(case: dict, device, meter: Meter, filler: _Filler) -> dict:
    kind = case["kind"]
    cfg = make_config(kind, case["quick"], case.get("layers"))
    meter.reset()
    base = meter.now()
    t0 = time.perf_counter()
    model = materialize(build_meta(kind, cfg, WEIGHT_DTYPES[case["wd"]], DTYPES[case["dtype"]]), WHAT[kind],
                        WEIGHT_DTYPES[case["wd"]], device, filler)
    seconds = time.perf_counter() - t0
    resident, peak = meter.now() - base, max(0, meter.peak() - base)
    tensors = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    del model
    return {"resident": resident, "peak": peak, "tensor_bytes": tensors, "seconds": round(seconds, 1)}


def _dit_case(case: dict, device, meter: Meter, filler: _Filler) -> dict:
    cfg = make_config("dit", case["quick"], case.get("layers"))
    dtype, wd = DTYPES[case["dtype"]], WEIGHT_DTYPES[case["wd"]]
    model = materialize(build_meta("dit", cfg, wd, dtype), WHAT["dit"], wd, device, filler)
    h = case["size"] // 32  # latent side
    plan = plan_roles(joint_roles(), 1, has_prompt=True, cfg_scale=4.5)
    g = torch.Generator().manual_seed(0)
    # As JodiPipeline.sample runs it: the caption rows [uncond, cond], the latents doubled for CFG, float32 in.
    y = (torch.randn(2, 1, cfg.model_max_length, cfg.caption_channels, generator=g) * CAPTION_SCALE).to(device, dtype)
    x = torch.randn(1, NUM_DOMAINS, cfg.in_channels, h, h, generator=g).to(device)
    t = torch.full((2,), 500.0, device=device)

    def step():
        with torch.inference_mode():
            ctx = model.prepare(plan, y)
            v = model.forward_prepared(torch.cat([x, x]), t, ctx).float()
            kv = sum(a.numel() * a.element_size() for a in ctx.caption_kv[0])
            return kv, bool(torch.isfinite(v).all())

    (kv_per_block, finite), peak, seconds = meter.measure(step)
    return {"activations": peak, "caption_kv_per_block": kv_per_block, "finite": finite, "seconds": round(seconds, 1)}


def _dcae_case(case: dict, device, meter: Meter, filler: _Filler) -> dict:
    cfg = make_config("dcae", case["quick"], case.get("layers"))
    dtype, wd = DTYPES[case["dtype"]], WEIGHT_DTYPES[case["wd"]]
    vae = materialize(build_meta("dcae", cfg, wd, dtype), WHAT["dcae"], wd, device, filler)
    size, tile, maps = case["size"], case.get("tile"), case["maps"]
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, maps, cfg.latent_channels, size // 32, size // 32, generator=g)
    tiling = {} if tile is None else {"tile_size": tile, "overlap": tile // 4}
    pipe = JodiPipeline(None, vae)

    def decode():
        with torch.inference_mode():
            if maps == NUM_DOMAINS:  # the pipeline's loop: one map at a time, resized and post-processed on the CPU
                roles = torch.zeros(1, NUM_DOMAINS, dtype=torch.long)
                images, _ = pipe.decode_latents(z * pipe.scaling_factor, roles, size, size, tiled=tile is not None,
                                                tile_size=tile)
                return all(bool(torch.isfinite(im).all()) for im in images.values())
            out = vae.decode(z[:, 0].to(device, dtype), **tiling)  # the decoder alone, one map
            return bool(torch.isfinite(out).all())

    finite, peak, seconds = meter.measure(decode)
    return {"activations": peak, "finite": finite, "seconds": round(seconds, 1)}


def _janus_case(case: dict, device, meter: Meter, filler: _Filler) -> dict:
    from jodi_core.janus.decode import DecodeStepper

    cfg = make_config("janus", case["quick"], case.get("layers"))
    dtype, wd = DTYPES[case["dtype"]], WEIGHT_DTYPES[case["wd"]]
    embed = "language_model.model.embed_tokens"
    model = materialize(build_meta("janus", cfg, wd, dtype), WHAT["janus"], wd, device, filler,
                        skip=TEXT_DECODE_UNUSED + (embed,))  # text decoding uses the language model alone
    lm = model.language_model
    # The token table only serves lookups: one random row broadcast over the vocabulary takes no memory (its bytes
    # are in the weights rows), which keeps a CPU run's RSS down by 1.6 GB in fp32.
    table = lm.model.embed_tokens
    row = filler.tensor((1, table.embedding_dim), table.weight.dtype, table.embedding_dim**-0.5, 0.0, device)
    table.weight = nn.Parameter(row.expand(table.num_embeddings, -1), requires_grad=False)
    prompt, new, steps = case["prompt"], case["new"], case["steps"]
    ids = torch.randint(0, cfg.language.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))

    def decode():
        # janus_understand_tokens without a tokenizer: the prompt's ids stand in for its image features (the SigLIP
        # pass over one 384 px image is small next to the language model).
        with torch.inference_mode():
            cache = model.new_cache(1, prompt + new)
            positions = torch.arange(prompt, device=device)[None]
            hidden = lm.model(lm.model.embed_tokens(ids.to(device)), positions, cache)
            logits = lm.lm_head(hidden[:, -1])
            stepper = DecodeStepper(lm.model, cache, 1, mode=model.decode_mode)
            position = positions[:, -1:] + 1
            for _ in range(steps):
                token = logits.float().argmax(-1)
                hidden = stepper(lm.model.embed_tokens(token[:, None]), position)
                logits = lm.lm_head(hidden[:, -1])
                position = position + 1
            return bool(torch.isfinite(logits.float()).all())

    finite, peak, seconds = meter.measure(decode)
    return {"activations": peak, "finite": finite, "seconds": round(seconds, 1)}


_RUNNERS = {"weights": _weights_case, "dit_step": _dit_case, "dcae_decode": _dcae_case, "janus_decode": _janus_case}


def warm_up(cases: list[dict], device, meter: Meter, filler: _Filler) -> None:
    """Run each kind of case once on the tiny configs, unmeasured: the lazy imports and one-time set-ups of the
    first meta init, the first forward and the first cast (~0.2 GB on the CPU) then do not land in a measurement."""
    seen = set()
    for case in cases:
        key = (case["op"], case["wd"], case["dtype"])
        if case["quick"] or key in seen:
            continue
        seen.add(key)
        tiny = {**case, "quick": True, "layers": 1, "size": 64, "tile": None, "maps": 1, "prompt": 4, "new": 4,
                "steps": 1}
        _RUNNERS[case["op"]](tiny, device, meter, filler)
        gc.collect()


def run_cases(cases: list[dict], device: str) -> list[dict]:
    """Run ``cases`` in this process, one after the other, each model freed before the next."""
    device = torch.device(device)
    meter = Meter(device)
    filler = _Filler(device)
    warm_up(cases, device, meter, filler)
    out = []
    for case in cases:
        res = _RUNNERS[case["op"]](case, device, meter, filler)
        res["process_peak"] = meter.peak()  # the whole process (RSS, or CUDA allocated) since the case's measurement
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        out.append({**case, "result": res})
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out


def run_child(cases: list[dict], device: str) -> list[dict]:
    """Run ``cases`` in a fresh process (clean RSS and allocator) whose glibc unmaps every freed block >= 64 KiB."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="65536",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, __file__, "--child", json.dumps(cases), "--device", device],
                         capture_output=True, text=True, env=env, cwd=str(REPO))
    if res.returncode != 0:
        raise RuntimeError(f"measuring {cases[0]['kind']} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# The plan: what is measured where
# ---------------------------------------------------------------------------------------------------------------------


def plan_cases(device: str, quick: bool) -> dict[str, list[dict]]:
    cuda = device.startswith("cuda")
    base = {"quick": quick}
    # Activation runs compute in bf16 on a GPU, in fp32 on a CPU (see the module docstring).
    act_dtype = "bf16" if cuda else "fp32"
    act = [("bf16", "bf16"), ("fp8", "fp8")] if cuda else [("fp32", "bf16"), ("fp8/fp32", "fp8")]
    plan: dict[str, list[dict]] = {"dit": [], "dcae": [], "janus": []}
    for wd in ("bf16", "fp8"):
        plan["dit"].append({**base, "op": "weights", "kind": "dit", "wd": wd, "dtype": "bf16"})
        plan["dcae"].append({**base, "op": "weights", "kind": "dcae", "wd": wd, "dtype": "bf16"})
        if cuda:
            plan["janus"].append({**base, "op": "weights", "kind": "janus", "wd": wd, "dtype": "bf16"})
        else:  # 1 and 3 language-model layers, extrapolated to the config's depth
            for layers in (1, 3):
                plan["janus"].append({**base, "op": "weights", "kind": "janus", "wd": wd, "dtype": "bf16",
                                      "layers": layers})
    # (label, weight dtype, DiT sizes, DC-AE (size, tile) runs)
    if cuda:
        runs = [(label, wd, [1024], [(1024, None), (1024, 512), (1024, 256)]) for label, wd in act]
        depth, dcae_depth, maps = None, None, NUM_DOMAINS
        janus = {"prompt": JANUS_PROMPT, "new": JANUS_NEW, "steps": JANUS_NEW - 1, "layers": None}
    elif quick:
        runs = [(label, wd, [64, 128], [(64, None), (160, 128)]) for label, wd in act]
        depth, dcae_depth, maps = 1, 1, 1
        janus = {"prompt": 16, "new": 32, "steps": 2, "layers": 1}
    else:  # fp8 changes the activations only by the cast copies: one size is enough to see them
        runs = [(act[0][0], act[0][1], [256, 512], [(256, None), (384, None), (384, 256)]),
                (act[1][0], act[1][1], [256], [(256, None)])]
        depth, dcae_depth, maps = 1, 1, 1
        janus = {"prompt": JANUS_PROMPT, "new": JANUS_NEW, "steps": 1, "layers": 1}
    for label, wd, dit_sizes, dcae_runs in runs:
        for size in dit_sizes:
            plan["dit"].append({**base, "op": "dit_step", "kind": "dit", "wd": wd, "dtype": act_dtype,
                                "label": label, "size": size, "layers": depth})
        for size, tile in dcae_runs:
            plan["dcae"].append({**base, "op": "dcae_decode", "kind": "dcae", "wd": wd, "dtype": act_dtype,
                                 "label": label, "size": size, "tile": tile, "maps": maps,
                                 "layers": dcae_depth})
        plan["janus"].append({**base, "op": "janus_decode", "kind": "janus", "wd": wd, "dtype": act_dtype,
                              "label": label, **janus})
    return plan


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GiB, 3)


class Report:
    def __init__(self):
        self.rows: list[dict] = []
        self.goals: list[dict] = []

    def row(self, what: str, dtype: str, measured: Optional[int], computed: Optional[int], how: str) -> dict:
        r = {"what": what, "dtype": dtype, "measured_gib": _gib(measured), "computed_gib": _gib(computed),
             "ratio": round(measured / computed, 2) if measured is not None and computed else None, "how": how}
        self.rows.append(r)
        return r

    def goal(self, what: str, value: int, limit: Optional[float], how: str) -> None:
        """A peak checked against ``limit`` GiB; without a limit, listed for reference."""
        self.goals.append({"what": what, "peak_gib": _gib(value), "limit_gib": limit,
                           "ok": None if limit is None else value <= limit * GiB, "how": how})

    def print(self) -> None:
        w = max(len(r["what"]) for r in self.rows)
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"\n{'what':{w}}  {'dtype':8} {'measured':>9} {'computed':>9} {'meas/comp':>9}  how (GiB = 2^30 bytes)")
        for r in self.rows:
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            print(f"{r['what']:{w}}  {r['dtype']:8} {fmt(r['measured_gib']):>9} {fmt(r['computed_gib']):>9} "
                  f"{ratio:>9}  {r['how']}")
        print("\nGoals (peak GiB on the device against the card's GiB):")
        for g in self.goals:
            if g["ok"] is None:
                print(f"  [--] {g['what']}: {g['peak_gib']:.2f} (reference, no goal)  ({g['how']})")
            else:
                print(f"  [{'ok' if g['ok'] else 'NO':2}] {g['what']}: {g['peak_gib']:.2f} <= {g['limit_gib']:.0f}"
                      f"  ({g['how']})")


def _find(results: list[dict], **match) -> list[dict]:
    return [r for r in results if all(r.get(k) == v for k, v in match.items())]


def build_report(results: list[dict], device: str, quick: bool) -> Report:
    cuda = device.startswith("cuda")
    rep = Report()
    where = "CUDA max_memory_allocated" if cuda else "CPU RSS"
    real = {k: REAL[k] for k in REAL}
    bf16 = torch.bfloat16
    tables = {(k, wd): weight_table(stored_meta(k, real[k], wd, bf16)) for k in real for wd in WEIGHT_DTYPES}
    metas = {k: meta_model(k, real[k], "default", bf16) for k in real}
    names = {"dit": "DiT weights (1.6 B, 20 blocks)", "dcae": "DC-AE weights (f32c32, encoder + decoder)",
             "janus": "Janus-Pro-7B weights (30 layers)"}

    # ---- weights ----
    weights, weights_measured = {}, {}
    for kind in ("dit", "dcae", "janus"):
        for wd in WEIGHT_DTYPES:
            weights[(kind, wd)] = total_bytes(tables[(kind, wd)])
            shapes = "parameter counts x bytes per dtype"
            cases = _find(results, kind=kind, op="weights", wd=wd)
            measured, how = None, shapes
            if len(cases) == 1:
                res = cases[0]["result"]
                measured = res["resident"]
                how = f"{where} after materialising (load peak {res['peak'] / GiB:.3f}) | {shapes}"
            elif len(cases) == 2:  # Janus at 1 and 3 layers, extrapolated
                one, three = sorted(cases, key=lambda c: c["layers"])
                slope = (three["result"]["resident"] - one["result"]["resident"]) / (three["layers"] - one["layers"])
                layers = make_config(kind, quick).language.num_layers
                measured = int(one["result"]["resident"] + slope * (layers - one["layers"]))
                how = (f"{where} with {one['layers']} and {three['layers']} LM layers + per-layer slope "
                       f"{slope / GiB:.3f} to {layers} | {shapes}")
            if quick:  # measured on the tiny config: compare with its shapes, then the real config computed alone
                if measured is not None:
                    tiny = total_bytes(weight_table(stored_meta(kind, make_config(kind, True), wd, bf16)))
                    rep.row(f"{WHAT[kind]} weights, tiny config", wd, measured, tiny, how)
                measured, how = None, shapes
            weights_measured[(kind, wd)] = measured
            rep.row(names[kind], wd, measured, weights[(kind, wd)], how)
    for kind, prefix in (("dit", ""), ("dcae", "decoder"), ("janus", "language_model")):
        stored = stored_meta(kind, real[kind], "fp8", bf16)
        rep.row(f"fp8 cast: largest fp8 weight of the {WHAT[kind]}{' ' + prefix if prefix else ''}, 1 x bf16", "fp8",
                None, ops.cast_workspace_bytes(stored.get_submodule(prefix) if prefix else stored),
                "shapes: CastOps' transient weight.to(bf16), scaled in place")

    # ---- activations at the sizes measured on the CPU (a GPU measures at 1024 px: the rows below) ----
    for case in [] if cuda else _find(results, op="dit_step"):
        res, dtype = case["result"], DTYPES[case["dtype"]]
        cfg = make_config("dit", quick)
        blocks = case["layers"] or cfg.depth
        extra = (cfg.depth - blocks) * res["caption_kv_per_block"]
        est = dit_step_estimate(cfg, case["wd"], dtype, case["size"])
        cut = f", {blocks} block(s) + caption K/V of {cfg.depth - blocks} more" if extra else ""
        rep.row(f"DiT step activations {case['size']} px, 8 domains, CFG{' (tiny)' if quick else ''}",
                case["label"], res["activations"] + extra, est,
                f"{where} of prepare + one forward{cut} | JodiPipeline.memory_needs (step)")
    for case in [] if cuda else _find(results, op="dcae_decode"):
        res, dtype = case["result"], DTYPES[case["dtype"]]
        est = decode_estimate(make_config("dcae", quick), case["wd"], dtype, case["size"], case["tile"], case["maps"])
        tiles = "whole" if case["tile"] is None else f"tiles {case['tile']} px"
        what = (f"DC-AE decode activations {case['size']} px, {tiles}, "
                f"{'8 maps' if case['maps'] == NUM_DOMAINS else '1 map'}{' (tiny)' if quick else ''}")
        depth = "" if case["layers"] is None else f", decoder cut to {case['layers']} block(s) per stage"
        path = "decode_latents" if case["maps"] == NUM_DOMAINS else "DCAE.decode"
        rep.row(what, case["label"], res["activations"], est, f"{where} of {path}{depth} | memory_needs (decode)")
    for case in [] if cuda else _find(results, op="janus_decode"):
        res, dtype = case["result"], DTYPES[case["dtype"]]
        cfg = make_config("janus", quick, case["layers"])
        est = janus_estimate(cfg, case["wd"], dtype, case["prompt"], case["new"])
        layers = cfg.language.num_layers
        rep.row(f"Janus decode activations, {case['prompt']} + {case['new']} tokens, {layers} layer(s)"
                f"{' (tiny)' if quick else ''}", case["label"], res["activations"], est,
                f"{where} of prefill + {case['steps']} step(s) (static cache) | JanusModel.kv_cache_bytes")

    # ---- computed at the real sizes (and measured there on a GPU) ----
    def measured_at(kind: str, op: str, wd: str, **match) -> Optional[int]:
        if not cuda:
            return None
        found = _find(results, kind=kind, op=op, wd=wd, **match)
        return found[0]["result"]["activations"] if found else None

    acts = {}
    unmeasured = "measured with --device cuda"
    for wd in WEIGHT_DTYPES:
        step = dit_step_estimate(real["dit"], wd, bf16, 1024)
        acts[("step", wd)] = (measured_at("dit", "dit_step", wd, size=1024), step)
        rep.row("DiT step activations 1024 px, 8 domains, CFG (batch 2)", wd, acts[("step", wd)][0], step,
                f"{where if cuda else unmeasured} | JodiPipeline.memory_needs (step)")
        for tile in (None, 512, 256):
            est = decode_estimate(real["dcae"], wd, bf16, 1024, tile, NUM_DOMAINS)
            acts[("decode", wd, tile)] = (measured_at("dcae", "dcae_decode", wd, size=1024, tile=tile), est)
            rep.row(f"DC-AE decode activations 1024 px, 8 maps, {'whole' if tile is None else f'tiles {tile} px'}",
                    wd, acts[("decode", wd, tile)][0], est,
                    f"{where + ' of decode_latents' if cuda else unmeasured} | memory_needs (decode)")
        kv = janus_estimate(real["janus"], wd, bf16, JANUS_PROMPT, JANUS_NEW)
        acts[("janus", wd)] = (measured_at("janus", "janus_decode", wd), kv)
        rep.row(f"Janus-Pro-7B decode activations, {JANUS_PROMPT} + {JANUS_NEW} tokens", wd,
                acts[("janus", wd)][0], kv,
                f"{where if cuda else unmeasured} | JanusModel.kv_cache_bytes")

    # ---- goals ----
    for wd in WEIGHT_DTYPES:
        for source in ("computed", "measured") if cuda else ("computed",):
            pick = (lambda pair: pair[1]) if source == "computed" else (lambda pair: pair[0])
            step, decode = pick(acts[("step", wd)]), pick(acts[("decode", wd, None)])
            kv = pick(acts[("janus", wd)])
            w = weights if source == "computed" else weights_measured
            if None in (step, decode, kv, w[("dit", wd)], w[("dcae", wd)], w[("janus", wd)]):
                continue
            # Both the estimates and the measured activations hold the fp8 cast copy.
            resident = w[("dit", wd)] + w[("dcae", wd)] + max(step, decode)
            rep.goal(f"Jodi 1024 px, 8 domains, CFG, {wd}, DiT + DC-AE resident ({source})", resident, GOAL_GIB,
                     "weights of both + max(step, whole decode) activations")
            rep.goal(f"Janus-Pro-7B, {wd}, {JANUS_PROMPT} + {JANUS_NEW} tokens ({source})",
                     w[("janus", wd)] + kv, GOAL_GIB if wd == "fp8" else None,
                     f"weights + KV cache{'' if source == 'computed' else ' and decode activations'}")
            dit_unit = largest_unit(metas["dit"], tables[("dit", wd)])
            vae_unit = largest_unit(metas["dcae"], tables[("dcae", wd)], "decoder")
            janus_unit = largest_unit(metas["janus"], tables[("janus", wd)], "language_model")
            rep.goal(f"Jodi low-VRAM, {wd} ({source})", max(dit_unit[1] + step, vae_unit[1] + decode),
                     LOW_VRAM_GOAL_GIB,
                     f"max(largest DiT unit {dit_unit[0]} {dit_unit[1] / 2**20:.0f} MiB + step, largest decoder unit "
                     f"{vae_unit[0]} {vae_unit[1] / 2**20:.0f} MiB + whole decode)")
            rep.goal(f"Janus-Pro-7B low-VRAM, {wd} ({source})", janus_unit[1] + kv, LOW_VRAM_GOAL_GIB,
                     f"largest unit {janus_unit[0]} {janus_unit[1] / 2**20:.0f} MiB + KV cache")
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (CI smoke test)")
    p.add_argument("--json", type=Path, default=None, help="write the rows and goals here too")
    p.add_argument("--only", nargs="+", choices=("dit", "dcae", "janus"), default=None,
                   help="measure only these models (the computed rows are always printed)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
        print(json.dumps(run_cases(json.loads(args.child), args.device)))
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")

    info = {"device": args.device, "quick": args.quick, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads()}
    if args.device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    print(json.dumps(info))
    t0 = time.perf_counter()
    plan = {k: v for k, v in plan_cases(args.device, args.quick).items() if not args.only or k in args.only}
    # One fresh process per model (clean RSS and allocator); --quick runs them all in one, to start torch once.
    groups = {"all": [c for cases in plan.values() for c in cases]} if args.quick else plan
    results: list[dict] = []
    for name, cases in groups.items():
        t = time.perf_counter()
        results += run_child(cases, args.device)
        print(f"measured {name}: {len(cases)} cases in {time.perf_counter() - t:.0f} s", flush=True)
    rep = build_report(results, args.device, args.quick)
    rep.print()
    info["largest_process_gib"] = _gib(max((r["result"]["process_peak"] for r in results), default=0))
    print(f"\nlargest measuring process: {info['largest_process_gib']:.2f} GiB "
          f"({'CUDA allocated' if args.device.startswith('cuda') else 'RSS'})")
    info["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"\n{info['seconds']:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "rows": rep.rows, "goals": rep.goals, "cases": results},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
