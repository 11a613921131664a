"""Jodi DiT / DC-AE speed: the reference-semantics PyTorch path vs our torch path vs our Triton path.

Not a test. Builds the real 1.6B DiT (``JODI_1600M_P1_D20``, random weights) and the DC-AE f32c32 decoder, and reports
side by side, in one run:

- linear attention alone (the core from the qkv GEMM output to the proj GEMM input);
- one DiT forward at 1024 px for joint generation (8 domains, CFG batch 2), perception (image given, 7 domains
  predicted, no CFG) and image + 1 condition (6 domains dropped, CFG batch 2);
- the fused GLUMBConv middle and LayerNorm+modulate against their torch op chains;
- DC-AE decode of 8 domains; a 20-step joint generation (DiT steps + the 8 decodes);
- peak GPU memory, ratios, and MFU against the card's dense bf16 peak (looked up by device name, e.g. 989 TFLOP/s
  for H100/H200 SXM; ``--peak-tflops`` for other cards).

Paths:
- ``ref``: the model's ``forward`` (every slot computed, caption K/V recomputed per call, as the reference does) with
  its attention replaced by a faithful re-statement of the official LiteLA (channel-major layout, bf16 pad-with-ones,
  two bf16 matmuls, divide in fp32);
- ``torch``: ``prepare`` + ``forward_prepared`` with ``attention_backend="torch"`` (no Triton anywhere);
- ``triton-attn``: ``attention_backend="triton"`` with the fused glue ops switched off (attention kernel only);
- ``triton``: ``attention_backend="triton"`` as the model runs it: Triton attention plus the fused ops from
  ``jodi_core.kernels`` (LayerNorm+modulate, SiLU+depthwise 3x3+GLU, gated residual) that layers.py calls.

GPU run: ``python benchmarks/bench_dit.py [--compile] [--json out.json]``. On a machine without CUDA a reduced size
runs (depth 2, 256 px, float32) so that the script itself is exercised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jodi_core.dit import layers  # noqa: E402
from jodi_core.dit.attention import AttentionBackend, linear_attention  # noqa: E402
from jodi_core.dit.model import JODI_1600M_P1_D20, JodiTransformer  # noqa: E402

# Dense bf16 tensor-core peaks (datasheets) by a part of torch.cuda.get_device_name(); the first match wins.
BF16_PEAKS_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200 NVL", 835.0), ("H200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("RTX 4090", 165.2),
)
peak_tflops = float("nan")  # of the card this run is on; set by main() (--peak-tflops overrides the table)


def bf16_peak_tflops(device_name: str) -> float:
    for part, tflops in BF16_PEAKS_TFLOPS:
        if part in device_name:
            return tflops
    return float("nan")


def mfu(tflops: float) -> float:
    return tflops / peak_tflops


# ---------------------------------------------------------------------------------------------------------------------
# The reference LiteLA, re-stated (official Sana/Jodi ``LiteLA.forward`` semantics at bf16 inference)
# ---------------------------------------------------------------------------------------------------------------------


def reference_litela_core(qkv: torch.Tensor, heads: int, dim: int, ignore: torch.Tensor | None, eps: float):
    """``qkv (B, N, 3C)`` (the qkv Linear output) -> ``(B, N, C)`` as the reference computes it.

    Channel-major q (B,h,d,N), k (B,h,N,d), v (B,h,d,N); ignored keys zeroed before the ReLU; v padded with a row of
    ones; ``vk = v @ k`` and ``out = vk @ q`` in the activation dtype (bf16 matmuls round their outputs); only then
    float32, divide by the last row, cast back and permute to token-major.
    """
    B, N, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.reshape(B, N, 3, C).permute(2, 0, 3, 1).unbind(0)  # 3 x (B, C, N)
    if ignore is not None:
        k = torch.where(ignore[:, None, :], 0, k)
    q = F.relu(q.reshape(B, heads, dim, N))
    k = F.relu(k.reshape(B, heads, dim, N).transpose(-1, -2))  # (B, h, N, d)
    v = F.pad(v.reshape(B, heads, dim, N), (0, 0, 0, 1), mode="constant", value=1.0)  # (B, h, d+1, N)
    vk = torch.matmul(v, k)  # (B, h, d+1, d)
    out = torch.matmul(vk, q).float()  # (B, h, d+1, N)
    out = (out[:, :, :-1] / (out[:, :, -1:] + eps)).to(qkv.dtype)
    # proj needs token-major rows; F.linear would copy the permuted view, so the copy is counted here.
    return out.reshape(B, C, N).permute(0, 2, 1).contiguous()


def _reference_attn_forward(self, x, key_mask, attention=None):
    ignore = None if key_mask is None else ~key_mask
    return self.proj(reference_litela_core(self.qkv(x), self.heads, self.head_dim, ignore, self.eps))


@contextlib.contextmanager
def patched(mode: str):
    """mode: 'ref' (reference LiteLA), 'nofused' (Triton attention but the fused glue ops off), else the model as is."""
    saved = (layers.LinearSelfAttention.forward, AttentionBackend.fused_ops)
    try:
        if mode == "ref":
            layers.LinearSelfAttention.forward = _reference_attn_forward
        elif mode == "nofused":
            AttentionBackend.fused_ops = lambda self, x: None
        yield
    finally:
        layers.LinearSelfAttention.forward, AttentionBackend.fused_ops = saved


# ---------------------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------------------


def bench(fn, device: torch.device, rep_ms: float = 300.0) -> float:
    """Median milliseconds of ``fn()``."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 10), rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mem_gib(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def dit_flops(config, tokens_per_row: int, rows: int, caption_len: int = 300) -> float:
    """Model FLOPs of one forward (flops_count.py: 69.33 M MACs per token per block at C=2240, caption K/V cached)."""
    C, Hd = config.hidden_size, config.mlp_hidden_size
    heads, d = C // config.linear_head_dim, config.linear_head_dim
    per_tok = 3 * C * C + C * C + heads * d * (d + 1) * 2 + C * C + 2 * caption_len * C + C * C
    per_tok += C * 2 * Hd + 2 * Hd * 9 + Hd * C
    final = C * config.out_channels
    return 2.0 * rows * tokens_per_row * (config.depth * per_tok + final)


# ---------------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------------


def bench_attention(device, dtype, B, T, C, head_dim, results, rep_ms):
    from jodi_core.kernels.linear_attention import linear_attention_triton

    heads = C // head_dim
    qkv = torch.randn(B, T, 3 * C, device=device, dtype=dtype)
    q, k, v = qkv.view(B, T, 3, heads, head_dim).unbind(2)
    L = 8
    ignore = torch.zeros(B, T, dtype=torch.bool, device=device)
    ignore[:, (L - 1) * T // L:] = True  # one domain of 8 ignored
    bytes_moved = qkv.numel() * qkv.element_size() + B * T * C * qkv.element_size()  # read qkv once, write out once
    rows = {}
    for mask_name, ign in (("no mask", None), ("1/8 keys masked", ignore)):
        keep = None if ign is None else ~ign
        fns = {"ref": lambda: reference_litela_core(qkv, heads, head_dim, ign, 1e-8),
               "torch": lambda: linear_attention(q, k, v, keep, 1e-8)}
        if device.type == "cuda":
            fns["triton"] = lambda: linear_attention_triton(q, k, v, keep, 1e-8)
        for name, fn in fns.items():
            ms = bench(fn, device, rep_ms)
            rows[f"{mask_name} / {name}"] = ms
            gbs = bytes_moved / (ms * 1e-3) / 1e9
            print(f"  attention {mask_name:16s} {name:7s} {ms:8.3f} ms  ({gbs:7.0f} GB/s effective)")
        if device.type == "cuda":
            # Accuracy of each against float64.
            ref64 = linear_attention(q.double(), k.double(), v.double(), keep)
            for name in ("ref", "torch", "triton"):
                out = fns[name]().view(B, T, heads, head_dim).double()
                err = float((out - ref64).norm() / ref64.norm())
                rows[f"{mask_name} / {name} rel err"] = err
                print(f"  attention {mask_name:16s} {name:7s} rel err vs float64 {err:.2e}")
    ref = rows["no mask / ref"]
    for name in ("torch", "triton"):
        if f"no mask / {name}" in rows:
            print(f"  attention speed-up {name} vs ref: {ref / rows[f'no mask / {name}']:.2f}x")
    results["attention"] = {"B": B, "T": T, "C": C, "ms": rows}


def _scenarios(L: int, cfg_rows: int):
    """name -> (role (R, L), rows N, domains that take part)."""
    joint = torch.zeros(1, L, dtype=torch.long)
    perception = torch.zeros(1, L, dtype=torch.long)
    perception[0, 0] = 1
    cond = torch.full((1, L), 2, dtype=torch.long)
    cond[0, 0], cond[0, 1] = 0, 1
    return {
        "joint (8 gen, CFG)": (joint, cfg_rows, L),
        "perception (no CFG)": (perception, 1, L),
        "image + 1 condition (CFG)": (cond, cfg_rows, 2),
    }


def bench_dit(model, device, dtype, hw, results, rep_ms):
    cfg = model.config
    h = w = hw
    T = h * w
    S = cfg.model_max_length
    out = {}
    for scen, (role, rows, active) in _scenarios(cfg.num_domains, 2).items():
        x = torch.randn(rows, cfg.num_domains, cfg.in_channels, h, w, device=device, dtype=dtype)
        clean = torch.randn(1, cfg.num_domains, cfg.in_channels, h, w, device=device, dtype=dtype)
        y = torch.randn(rows, 1, S, cfg.caption_channels, device=device, dtype=dtype)
        mask = torch.ones(rows, S, dtype=torch.bool, device=device)
        mask[:, S // 2:] = False
        t = torch.full((rows,), 700.0, device=device)
        role_dev = role.to(device)
        clean_x = clean if rows == 1 else clean.repeat(rows, 1, 1, 1, 1)
        flops = dit_flops(cfg, T * active, rows)
        row = {"rows": rows, "active_domains": active, "tflop": flops / 1e12}
        paths = [("ref", "torch", "ref"), ("torch", "torch", None), ("triton-attn", "triton", "nofused"),
                 ("triton", "triton", None)]
        if device.type != "cuda":
            paths = [p for p in paths if p[1] == "torch"]
        outputs = {}
        for name, backend, patch in paths:
            model.attention_backend = backend
            with patched(patch or ""), torch.inference_mode():
                if name == "ref":
                    def fn():
                        return model(x, t, y, role_dev, mask, clean_x)
                else:
                    ctx = model.prepare(role_dev, y, mask)

                    def fn():
                        return model.forward_prepared(x, t, ctx, clean_x)
                o = fn()
                finite = bool(torch.isfinite(o).all())
                outputs[name] = o.float()
                ms = bench(fn, device, rep_ms)
                mem = peak_mem_gib(fn, device)
            tflops = flops / (ms * 1e-3) / 1e12
            row[name] = {"ms": ms, "peak_gib": mem, "tflops": tflops, "mfu": mfu(tflops),
                         "finite": finite}
            print(f"  DiT {scen:28s} {name:12s} {ms:9.2f} ms  peak {mem:6.2f} GiB  {tflops:6.1f} TFLOP/s  "
                  f"MFU {100 * mfu(tflops):5.1f}%  finite={finite}")
        # Generated slots only (the reference path returns garbage for condition/ignored slots).
        gen = [d for d in range(cfg.num_domains) if bool((role[:, d] == 0).any())]
        base = outputs["torch"][:, gen]
        for name in ("ref", "torch", "triton-attn", "triton"):
            if name not in row:
                continue
            diff = float((outputs[name][:, gen] - base).norm() / base.norm())
            row[name]["rel_diff_vs_torch"] = diff
            if name != "ref":
                print(f"  DiT {scen:28s} speed-up {name} vs ref: {row['ref']['ms'] / row[name]['ms']:.2f}x")
            print(f"  DiT {scen:28s} {name:12s} output rel. difference vs torch path: {diff:.2e}")
        out[scen] = row
    results["dit"] = out



def bench_compile(model, device, dtype, hw, results, rep_ms):
    """Joint step with torch.compile'd blocks: the DiT attention path must trace (Triton kernels included)."""
    cfg = model.config
    T = hw * hw
    h = w = hw
    S = cfg.model_max_length
    scen = "joint (8 gen, CFG)"
    role, rows, active = _scenarios(cfg.num_domains, 2)[scen]
    x = torch.randn(rows, cfg.num_domains, cfg.in_channels, h, w, device=device, dtype=dtype)
    y = torch.randn(rows, 1, S, cfg.caption_channels, device=device, dtype=dtype)
    t = torch.full((rows,), 700.0, device=device)
    flops = dit_flops(cfg, T * active, rows)
    comp = {}
    from torch._dynamo.utils import counters

    for name, backend, patch in (("torch+compile", "torch", None), ("triton+compile", "triton", None)):
        torch._dynamo.reset()
        counters.clear()
        compiled = [torch.compile(blk) for blk in model.blocks]
        saved = model.blocks
        model.blocks = torch.nn.ModuleList(compiled)
        model.attention_backend = backend
        try:
            with patched(patch or ""), torch.inference_mode():
                ctx = model.prepare(role.to(device), y, None)
                t0 = time.perf_counter()
                o = model.forward_prepared(x, t, ctx)
                torch.cuda.synchronize()
                first = time.perf_counter() - t0
                ms = bench(lambda: model.forward_prepared(x, t, ctx), device, rep_ms)
            tflops = flops / (ms * 1e-3) / 1e12
            breaks = dict(counters["graph_break"])  # reason -> count, over all compiled blocks
            comp[name] = {"ms": ms, "first_call_s": first, "tflops": tflops, "mfu": mfu(tflops),
                          "finite": bool(torch.isfinite(o).all()), "graph_breaks": breaks}
            print(f"  DiT {scen:28s} {name:20s} {ms:9.2f} ms  (first call {first:.1f} s)  "
                  f"MFU {100 * mfu(tflops):5.1f}%  graph breaks {sum(breaks.values())}")
            for reason, n in breaks.items():
                print(f"    graph break x{n}: {reason.splitlines()[0]}"[:300])
        except Exception as exc:  # report, keep the rest of the run
            comp[name] = {"error": repr(exc)[:500]}
            print(f"  DiT {name}: FAILED {exc!r}"[:600])
        finally:
            model.blocks = saved
    results["dit_compile"] = comp


def bench_fused_ops(device, dtype, rows, hw, C, Hd, results, rep_ms):
    from jodi_core.kernels.dwconv_glu import dwconv_glu_torch, dwconv_glu_triton
    from jodi_core.kernels.layernorm_modulate import layernorm_modulate_torch, layernorm_modulate_triton

    out = {}
    x = torch.randn(rows, 2 * Hd, hw, hw, device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    wgt = torch.randn(2 * Hd, 1, 3, 3, device=device, dtype=dtype) / 3
    bias = torch.randn(2 * Hd, device=device, dtype=dtype)
    ref = dwconv_glu_torch(x.float(), wgt.float(), bias.float())
    variants = [("torch", lambda: dwconv_glu_torch(x, wgt, bias)), ("triton", lambda: dwconv_glu_triton(x, wgt, bias))]
    for rows in (32, 8, 4):
        for bx, bc, nw in ((8, 128, 4), (16, 128, 8), (8, 64, 4), (16, 64, 4)):
            variants.append((f"triton bx{bx} bc{bc} r{rows} w{nw}", lambda bx=bx, bc=bc, nw=nw, rows=rows:
                             dwconv_glu_triton(x, wgt, bias, block_x=bx, block_c=bc, rows=rows, num_warps=nw)))
    for name, fn in variants:
        ms = bench(fn, device, rep_ms)
        err = float((fn().float() - ref).norm() / ref.norm())
        out[f"dwconv_glu {name}"] = {"ms": ms, "rel_err_vs_fp32": err}
        gb = (x.numel() + x.numel() // 2) * x.element_size() / 1e9
        print(f"  SiLU+dwconv3x3+GLU {name:26s} {ms:8.3f} ms  ({gb / (ms * 1e-3):6.0f} GB/s vs 1R+0.5W)  "
              f"rel err vs fp32 {err:.1e}")
    N, L, T = max(1, rows // 8), 8, hw * hw
    xs = torch.randn(N, L, T, C, device=device, dtype=dtype)
    print(f"  LayerNorm+modulate and gated residual on x of shape {tuple(xs.shape)}")
    mod = torch.randn(N, L, 6, C, device=device, dtype=dtype)
    shift, scale, *_ = mod.unsqueeze(3).unbind(2)
    ref = layernorm_modulate_torch(xs.float(), shift.float(), scale.float())
    for name, fn in (("torch", lambda: layernorm_modulate_torch(xs, shift, scale)),
                     ("triton", lambda: layernorm_modulate_triton(xs, shift, scale))):
        ms = bench(fn, device, rep_ms)
        err = float((fn().float() - ref).norm() / ref.norm())
        out[f"layernorm_modulate {name}"] = {"ms": ms, "rel_err_vs_fp32": err}
        gb = 2 * xs.numel() * xs.element_size() / 1e9
        print(f"  LayerNorm+modulate {name:7s} {ms:8.3f} ms  ({gb / (ms * 1e-3):6.0f} GB/s vs 1R+1W)  "
              f"rel err vs fp32 {err:.1e}")
    gate = torch.randn(N, L, 1, C, device=device, dtype=dtype)
    other = torch.randn_like(xs)
    from jodi_core.kernels.gate_residual import gate_residual_triton

    for name, fn in (("x + g*y", lambda: xs + gate * other), ("addcmul", lambda: torch.addcmul(xs, gate, other)),
                     ("triton", lambda: gate_residual_triton(xs, gate, other))):
        ms = bench(fn, device, rep_ms)
        out[f"gate_residual {name}"] = {"ms": ms}
        print(f"  gate + residual    {name:7s} {ms:8.3f} ms")
    results["fused_ops"] = out


def profile_step(model, device, dtype, hw, out_dir, results):
    """Top CUDA kernels of one joint torch-path step (what the fusion choice is based on)."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model.config
    x = torch.randn(2, cfg.num_domains, cfg.in_channels, hw, hw, device=device, dtype=dtype)
    y = torch.randn(2, 1, cfg.model_max_length, cfg.caption_channels, device=device, dtype=dtype)
    t = torch.full((2,), 700.0, device=device)
    tables = {}
    for name, backend, patch in (("torch", "torch", None), ("triton", "triton", None)):
        model.attention_backend = backend
        with patched(patch or ""), torch.inference_mode():
            ctx = model.prepare(torch.zeros(1, cfg.num_domains, dtype=torch.long, device=device), y, None)
            model.forward_prepared(x, t, ctx)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model.forward_prepared(x, t, ctx)
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70)
        tables[name] = table
        print(f"  profile, joint step, {name} path:\n{table}")
    if out_dir:
        Path(out_dir, "profile.txt").write_text("\n\n".join(f"== {k}\n{v}" for k, v in tables.items()))


def bench_dcae_and_generation(model, device, dtype, hw, n_domains, results, rep_ms, steps):
    from jodi_core.dcae.model import DC_AE_F32C32_SANA_1_0, DCAE

    vae = DCAE(DC_AE_F32C32_SANA_1_0, dtype=dtype, device=device).eval()
    z = torch.randn(n_domains, 32, hw, hw, device=device, dtype=dtype)
    px = hw * 32
    tflop = 8.37 * n_domains * (px / 1024) ** 2  # analytic, flops_count.py
    results["dcae_decode"] = {}
    decoded = {}
    # LiteMLA on the reference's matmuls (torch) and on the Triton linear-attention kernel, side by side.
    for backend in ("torch", "triton") if device.type == "cuda" else ("torch",):
        vae.attention_backend = backend
        with torch.inference_mode():
            decoded[backend] = vae.decode(z).float()
            ms = bench(lambda: vae.decode(z), device, max(rep_ms, 500))
            mem = peak_mem_gib(lambda: vae.decode(z), device)
        tfs = tflop / (ms * 1e-3)
        print(f"  DC-AE decode {n_domains} x {px}px, {backend:6s} attention: {ms:8.2f} ms  peak {mem:6.2f} GiB  "
              f"{tfs:6.1f} TFLOP/s  MFU {100 * mfu(tfs):5.1f}%")
        results["dcae_decode"][backend] = {"domains": n_domains, "px": px, "ms": ms, "peak_gib": mem, "tflops": tfs}
    if "triton" in decoded:
        diff = float((decoded["triton"] - decoded["torch"]).norm() / decoded["torch"].norm())
        results["dcae_decode"]["triton"]["rel_diff_vs_torch"] = diff
        print(f"  DC-AE decode speed-up triton vs torch attention: "
              f"{results['dcae_decode']['torch']['ms'] / results['dcae_decode']['triton']['ms']:.2f}x; "
              f"output rel. difference {diff:.2e}")
    vae.attention_backend = "auto"

    cfg = model.config
    gen = {}
    paths = [("torch", "torch", None), ("triton", "triton", None)]
    if device.type != "cuda":
        paths = paths[:1]
    for name, backend, patch in paths:
        model.attention_backend = backend
        with patched(patch or ""), torch.inference_mode():
            y = torch.randn(2, 1, cfg.model_max_length, cfg.caption_channels, device=device, dtype=dtype)

            def run():
                ctx = model.prepare(torch.zeros(1, cfg.num_domains, dtype=torch.long, device=device), y, None)
                xg = torch.randn(1, cfg.num_domains, cfg.in_channels, hw, hw, device=device, dtype=dtype)
                sig = torch.linspace(1.0, 0.0, steps + 1, device=device)
                for i in range(steps):
                    v = model.forward_prepared(torch.cat([xg, xg]), (sig[i] * 1000).expand(2), ctx)
                    v = v[:1] + 4.5 * (v[1:] - v[:1])  # CFG
                    xg = xg + (sig[i + 1] - sig[i]).to(dtype) * v
                imgs = vae.decode(xg[0] / vae.scaling_factor)
                return imgs

            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            mem = peak_mem_gib(run, device)
        gen[name] = {"s": min(times), "peak_gib": mem}
        print(f"  {steps}-step joint generation at {hw * 32}px + {n_domains} decodes, {name:12s}: "
              f"{min(times):6.2f} s  peak {mem:6.2f} GiB")
    results["generation"] = gen


def _section(title: str, fn, *args) -> None:
    """Run one section; a failure is printed and the run goes on to the next section."""
    print(f"== {title}")
    try:
        fn(*args)
    except Exception:  # report and keep the other numbers
        import traceback

        traceback.print_exc()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile'd blocks (torch and triton)")
    ap.add_argument("--json", type=str, default=None, help="write all numbers here")
    ap.add_argument("--out-dir", type=str, default=None, help="folder for the profile table")
    ap.add_argument("--skip", type=str, default="", help="comma list of: attention,dit,fused,profile,dcae")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the card's dense bf16 peak for MFU (default: looked up by device name)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    global peak_tflops
    peak_tflops = args.peak_tflops or bf16_peak_tflops(results["device"])
    results["bf16_peak_tflops"] = peak_tflops
    if cuda:
        import triton

        results["triton"] = triton.__version__
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        ms = bench(lambda: a @ a, device, 200)
        results["matmul_8192_bf16_tflops"] = 2 * 8192**3 / (ms * 1e-3) / 1e12
        del a
        config, dtype, hw, steps = JODI_1600M_P1_D20, torch.bfloat16, 32, args.steps
        rep = 300.0
    else:
        torch.set_num_threads(max(1, torch.get_num_threads()))
        import dataclasses

        config = dataclasses.replace(JODI_1600M_P1_D20, depth=2)
        dtype, hw, steps, rep = torch.float32, 8, 2, 0.0
    print(f"device {results['device']}, torch {torch.__version__}, config depth {config.depth}, latent {hw}x{hw}, "
          f"{dtype}")
    if "matmul_8192_bf16_tflops" in results:
        print(f"  bf16 8192^3 matmul: {results['matmul_8192_bf16_tflops']:.0f} TFLOP/s (datasheet peak "
              f"{peak_tflops:.0f}{'' if peak_tflops == peak_tflops else '; unknown card: pass --peak-tflops'})")

    if "attention" not in skip:
        _section("linear attention alone (B=2 CFG, 8 domains x latent tokens, 70 heads x 32)", bench_attention,
                 device, dtype, 2, 8 * hw * hw, config.hidden_size, config.linear_head_dim, results, rep)
    model = JodiTransformer(config, dtype=dtype, device=device).eval()
    model.check_inputs = False  # no host syncs inside the timed region
    if "fused" not in skip and cuda:
        _section("fused ops vs their torch chains (joint CFG step sizes)", bench_fused_ops,
                 device, dtype, 16, hw, config.hidden_size, config.mlp_hidden_size, results, rep)
    if "dit" not in skip:
        _section("one DiT forward", bench_dit, model, device, dtype, hw, results, rep)
    if "profile" not in skip and cuda:
        _section("profile", profile_step, model, device, dtype, hw, args.out_dir, results)
    if "dcae" not in skip:
        _section("DC-AE decode and generation", bench_dcae_and_generation,
                 model, device, dtype, hw if cuda else 4, 8 if cuda else 1, results, rep, steps)

    if args.compile and cuda:
        _section("torch.compile", bench_compile, model, device, dtype, hw, results, rep)

    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
