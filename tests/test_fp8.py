"""fp8 weights: storage at load time (CastOps and host ops), fp8 checkpoints (plain and ComfyUI's scaled layout),
``python -m jodi_core convert``, the fp8 matmul path's fallback, and the quality cost measured against bf16.

Tolerances are the measured worst cases (CPU, bf16 compute) with some margin; the numbers are in the comments.
"""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from jodi_core import fp8, ops
from jodi_core.checkpoint import CheckpointError
from jodi_core.dcae.model import DCAE, DCAEConfig
from jodi_core.loading import jodi_from_state_dict, load_dcae, load_jodi
from jodi_core.dit.model import JodiConfig, JodiTransformer

from conftest import fixture_config_overrides
from janus_tiny import TINY_CONFIG, write_tiny_janus

FP8 = ("fp8_e4m3fn", "fp8_e5m2")
# Worst ||fp8 - bf16|| / ||bf16|| measured on the golden fixtures (random weights, so harsher than trained ones):
# DiT 0.039 (e4m3fn) / 0.062 (e5m2) over 7 cases; DC-AE latent 0.053 / 0.113, reconstruction 0.070 / 0.136.
DIT_REL = {"fp8_e4m3fn": 0.06, "fp8_e5m2": 0.10}
DCAE_REL = {"fp8_e4m3fn": 0.10, "fp8_e5m2": 0.20}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dit_fixture(fixtures_dir):
    meta = json.loads((fixtures_dir / "dit_tiny_cases.json").read_text())
    return (load_file(fixtures_dir / "dit_tiny_weights.safetensors"), fixture_config_overrides(fixtures_dir), meta,
            load_file(fixtures_dir / "dit_tiny_cases.safetensors"))


@pytest.fixture(scope="module")
def dcae_fixture(fixtures_dir):
    meta = json.loads((fixtures_dir / "dcae_tiny_cases.json").read_text())
    return load_file(fixtures_dir / "dcae_tiny_weights.safetensors"), meta, load_file(
        fixtures_dir / "dcae_tiny_cases.safetensors")


def _dit(sd, overrides, **kw):
    return jodi_from_state_dict(dict(sd), attention_backend="torch", **overrides, **kw)


def _run_dit(model, tensors, name):
    inp = {k: tensors[f"{name}.{k}"] for k in ("x", "timestep", "y", "mask", "role", "clean_x")}
    with torch.no_grad():
        return model(inp["x"], inp["timestep"], inp["y"], role=inp["role"], mask=inp["mask"],
                     clean_x=inp["clean_x"]).float()


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _save(path, sd, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Names and dtypes
# ---------------------------------------------------------------------------------------------------------------------


def test_weight_dtype_names():
    assert ops.WEIGHT_DTYPES == ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
    assert ops.storage_dtype("default") is None
    assert ops.storage_dtype("fp8_e4m3fn") is ops.storage_dtype("fp8_e4m3fn_fast") is torch.float8_e4m3fn
    assert ops.storage_dtype("fp8_e5m2") is torch.float8_e5m2
    with pytest.raises(ValueError, match="weight_dtype"):
        ops.storage_dtype("fp4")
    assert not ops.fp8_matmul_supported("cpu")


def test_pow2_scales_use_the_range_and_dequantise_exactly():
    w = torch.randn(64, 32) * 0.02
    q, scale = fp8.quantize(w, torch.float8_e4m3fn, scaled=True)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.dim() == 0
    assert 224 < float(q.float().abs().max()) <= 448  # the largest weight lands in the top binade
    assert float(torch.log2(scale)) == round(float(torch.log2(scale)))
    assert torch.equal(q.float() * scale, (q.float() * scale).bfloat16().float())  # exact in bf16 too
    assert _rel(q.float() * scale, w) < 0.04
    plain, none = fp8.quantize(w * 1e4, torch.float8_e4m3fn, scaled=False)  # out of range saturates, no NaN
    assert none is None and not fp8.fp8_nonfinite(plain)


# ---------------------------------------------------------------------------------------------------------------------
# default: today's models, bit for bit
# ---------------------------------------------------------------------------------------------------------------------


def test_default_weight_dtype_is_bit_identical_to_plain_loading(fixtures_dir, dit_fixture, dcae_fixture):
    # Same file for both: kernels may sum in another order for tensors at other alignments (a re-saved file's
    # mmap moves the DiT's output by 2e-6 with the code before weight_dtype too).
    sd, overrides, meta, tensors = dit_fixture
    path = fixtures_dir / "dit_tiny_weights.safetensors"
    today = JodiTransformer(JodiConfig.from_state_dict(sd, **overrides), attention_backend="torch").eval()
    today.load_state_dict(load_file(path), strict=True, assign=True)
    for model in (load_jodi(path, weight_dtype="default", operations=None, attention_backend="torch", **overrides),
                  _dit(load_file(path), overrides)):
        assert all(type(m) in (nn.Linear, nn.Conv2d) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
        for case in meta["cases"]:
            assert torch.equal(_run_dit(model, tensors, case["name"]), _run_dit(today, tensors, case["name"]))

    vsd, vmeta, vtensors = dcae_fixture
    vpath = fixtures_dir / "dcae_tiny_weights.safetensors"
    plain = DCAE(DCAEConfig.from_state_dict(vsd)).eval()
    plain.load_state_dict(load_file(vpath), strict=True, assign=True)
    vae = load_dcae(vpath, weight_dtype="default")
    for case in vmeta["cases"]:
        image, latent = vtensors[f"{case['name']}.image"], vtensors[f"{case['name']}.latent"]
        with torch.no_grad():
            assert torch.equal(vae.encode(image), plain.encode(image))
            assert torch.equal(vae.decode(latent), plain.decode(latent))


def test_default_janus_is_bit_identical(tmp_path):
    from jodi_core.janus import load_janus
    from jodi_core.janus.loading import read_janus_state_dict
    from jodi_core.janus.model import JanusModel

    folder = write_tiny_janus(tmp_path / "Janus-Tiny")
    plain = JanusModel(TINY_CONFIG).eval()
    plain.load_state_dict(read_janus_state_dict(folder)[0], strict=True)
    model = load_janus(folder, weight_dtype="default", operations=None)
    ids = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))


# ---------------------------------------------------------------------------------------------------------------------
# fp8 storage against bf16: golden fixtures, tiny Janus, demo model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weight_dtype", FP8)
def test_fp8_dit_close_to_bf16_on_every_fixture_case(dit_fixture, weight_dtype):
    sd, overrides, meta, tensors = dit_fixture
    ref = _dit(sd, overrides, dtype=torch.bfloat16)
    model = _dit(sd, overrides, dtype=torch.bfloat16, weight_dtype=weight_dtype)
    assert model.blocks[0].attn.qkv.weight.dtype == ops.storage_dtype(weight_dtype)
    assert model.dtype == torch.bfloat16  # tables and norms keep the compute dtype
    worst = max(_rel(_run_dit(model, tensors, c["name"]), _run_dit(ref, tensors, c["name"])) for c in meta["cases"])
    assert 0 < worst < DIT_REL[weight_dtype], worst


@pytest.mark.parametrize("weight_dtype", FP8)
def test_fp8_dcae_close_to_bf16_on_every_fixture_case(dcae_fixture, weight_dtype):
    sd, meta, tensors = dcae_fixture
    ref = DCAE.from_state_dict(sd, dtype=torch.bfloat16)
    model = DCAE.from_state_dict(sd, dtype=torch.bfloat16, weight_dtype=weight_dtype)
    assert model.encoder.stages[0].op_list[0].main.conv1.conv.weight.dtype == ops.storage_dtype(weight_dtype)
    assert model.encoder.project_in.conv.weight.dtype == torch.bfloat16  # first and last layers stay 16-bit
    for case in meta["cases"]:
        image, latent = tensors[f"{case['name']}.image"].bfloat16(), tensors[f"{case['name']}.latent"].bfloat16()
        with torch.no_grad():
            assert _rel(model.encode(image), ref.encode(image)) < DCAE_REL[weight_dtype]
            assert _rel(model.decode(latent), ref.decode(latent)) < DCAE_REL[weight_dtype]


@pytest.mark.parametrize("layout", ["original", "hf"])
@pytest.mark.parametrize("weight_dtype", FP8)
def test_fp8_janus_close_to_bf16(tmp_path, layout, weight_dtype):
    from jodi_core.janus import load_janus

    folder = write_tiny_janus(tmp_path / "Janus-Tiny", layout=layout)
    ref = load_janus(folder, dtype=torch.bfloat16)
    model = load_janus(folder, dtype=torch.bfloat16, weight_dtype=weight_dtype)
    lm = model.language_model
    assert lm.model.layers[0].mlp.up_proj.weight.dtype == ops.storage_dtype(weight_dtype)
    assert lm.model.embed_tokens.weight.dtype == torch.bfloat16 and model.dtype == torch.bfloat16
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    codes = torch.randint(0, TINY_CONFIG.vq.codebook_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # measured (random tiny weights): logits 0.05 (e4m3fn) / 0.10 (e5m2), images 0.03 / 0.06
        assert _rel(model(ids), ref(ids)) < {"fp8_e4m3fn": 0.1, "fp8_e5m2": 0.2}[weight_dtype]
        assert _rel(model.decode_image_codes(codes), ref.decode_image_codes(codes)) < {"fp8_e4m3fn": 0.1,
                                                                                       "fp8_e5m2": 0.2}[weight_dtype]


def test_fp8_parameters_take_about_half_of_bf16(tmp_path, dit_fixture):
    from jodi_core.jobs.demo import DEMO_DIT, DEMO_VAE
    from jodi_core.janus import load_janus

    pairs = [(lambda **kw: load_jodi(DEMO_DIT, dtype=torch.bfloat16, **kw)),
             (lambda **kw: load_dcae(DEMO_VAE, dtype=torch.bfloat16, **kw))]
    folder = write_tiny_janus(tmp_path / "Janus-Tiny")
    pairs.append(lambda **kw: load_janus(folder, dtype=torch.bfloat16, **kw))
    for load in pairs:
        full, small = _param_bytes(load()), _param_bytes(load(weight_dtype="fp8_e4m3fn"))
        assert 0.45 < small / full < 0.56, (small, full)  # demo DiT 0.51, demo DC-AE 0.53, tiny Janus 0.52


def test_demo_model_in_fp8_close_to_bf16():
    from jodi_core.jobs.demo import DEMO_DIT, DEMO_VAE, demo_scene
    from jodi_core.pipeline import JodiPipeline

    scene = demo_scene()
    outs = {}
    for wd in ("default", "fp8_e4m3fn"):
        pipe = JodiPipeline(load_jodi(DEMO_DIT, dtype=torch.bfloat16, weight_dtype=wd),
                            load_dcae(DEMO_VAE, dtype=torch.bfloat16, weight_dtype=wd))
        outs[wd] = pipe(["condition"] + ["generate"] * 7, 64, 64, conditions={"image": scene["image"]}, steps=2,
                        seed=0)
    a, b = outs["default"], outs["fp8_e4m3fn"]
    assert _rel(b.latents, a.latents) < 0.05  # measured 0.015 (e5m2: 0.031)
    assert float((b.images["depth"] - a.images["depth"]).abs().mean()) < 0.01  # measured 0.0016 (e5m2: 0.0039)


@pytest.mark.slow  # ~3 min on one thread: two evaluations of 5 pipeline runs over 12 scenes
def test_demo_quality_in_fp8_nearly_unchanged():
    """The demo quality checks (tests/test_demo_quality.py) with fp8 weights computed in fp32, against fp32 weights.
    Measured: every metric within 1% relative (bf16 compute gives the same deltas, but bf16 matmuls on CPU are slow).
    """
    from test_demo_quality import _evaluate, dq

    from jodi_core.jobs.demo import DEMO_DIT, DEMO_VAE

    f32 = dict(dtype=torch.float32)  # the files are fp16, which CPUs compute slowly
    ref = _evaluate(load_jodi(DEMO_DIT, **f32), load_dcae(DEMO_VAE, **f32))
    got = _evaluate(load_jodi(DEMO_DIT, weight_dtype="fp8_e4m3fn", **f32),
                    load_dcae(DEMO_VAE, weight_dtype="fp8_e4m3fn", **f32))
    assert dq.failed_checks(got) == [], got
    for key, _, _ in dq.THRESHOLDS:
        assert abs(got[key] - ref[key]) <= 0.03 * abs(ref[key]), (key, got[key], ref[key])


# ---------------------------------------------------------------------------------------------------------------------
# fp8 checkpoints: plain and scaled
# ---------------------------------------------------------------------------------------------------------------------


def _fp8_keys(sd, overrides):
    """The weights an fp8 weight_dtype stores in fp8 (what an fp8 file of this pack holds in fp8)."""
    with torch.device("meta"):
        model = JodiTransformer(JodiConfig.from_state_dict(sd, **overrides))
    return set(fp8.fp8_layers(model, "Jodi DiT"))


def test_plain_fp8_file_loads(tmp_path, dit_fixture):
    sd, overrides, meta, tensors = dit_fixture
    keys = _fp8_keys(sd, overrides)
    plain = {k: (v.to(torch.float8_e4m3fn) if k in keys else v.bfloat16()) for k, v in sd.items()}
    path = _save(tmp_path / "plain.safetensors", plain)
    model = load_jodi(path, attention_backend="torch", **overrides)  # default: dequantised to the file's bf16
    assert model.dtype == torch.bfloat16 and {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.blocks[0].attn.qkv.weight, plain["blocks.0.attn.qkv.weight"].bfloat16())
    # fp32 compute below: this tiny random model turns bf16 rounding-order differences into percents
    model = load_jodi(path, dtype=torch.float32, attention_backend="torch", **overrides)
    stored = load_jodi(path, dtype=torch.float32, weight_dtype="fp8_e4m3fn", attention_backend="torch", **overrides)
    assert torch.equal(stored.blocks[0].attn.qkv.weight, plain["blocks.0.attn.qkv.weight"])  # kept as stored
    for case in meta["cases"]:  # the same real weights, cast on use
        assert _rel(_run_dit(stored, tensors, case["name"]), _run_dit(model, tensors, case["name"])) < 1e-5


@pytest.mark.parametrize("marker", [torch.float8_e4m3fn, torch.float32], ids=["fp8-marker", "float32-marker"])
def test_comfyui_scaled_fp8_file_loads(tmp_path, dit_fixture, marker):
    """ComfyUI's layout: any float32 scale (not a power of two), a scale_input, the marker."""
    sd, overrides, meta, tensors = dit_fixture
    scaled = {k: v.bfloat16() for k, v in sd.items()}
    for k in _fp8_keys(sd, overrides):
        scale = sd[k].abs().max() / 448
        scaled[k] = (sd[k] / scale).to(torch.float8_e4m3fn)
        scaled[k[: -len("weight")] + "scale_weight"] = scale.float()
        scaled[k[: -len("weight")] + "scale_input"] = torch.tensor(1.0)
    scaled["scaled_fp8"] = torch.empty(0, dtype=marker)
    path = _save(tmp_path / "scaled.safetensors", scaled)
    model = load_jodi(path, dtype=torch.float32, attention_backend="torch", **overrides)
    key = "blocks.0.attn.qkv.weight"
    expected = scaled[key].float() * scaled["blocks.0.attn.qkv.scale_weight"]
    assert torch.equal(model.blocks[0].attn.qkv.weight, expected)
    assert load_jodi(path, attention_backend="torch", **overrides).dtype == torch.bfloat16  # the file's 16 bits
    stored = load_jodi(path, dtype=torch.float32, weight_dtype="fp8_e4m3fn", attention_backend="torch", **overrides)
    qkv = stored.blocks[0].attn.qkv
    assert torch.equal(qkv.weight, scaled[key])
    assert torch.equal(qkv.scale_weight, scaled["blocks.0.attn.qkv.scale_weight"])
    for case in meta["cases"]:  # kept with the file's own scales: the same real weights
        assert _rel(_run_dit(stored, tensors, case["name"]), _run_dit(model, tensors, case["name"])) < 1e-5


def test_newer_comfy_quant_entries(tmp_path, dcae_fixture):
    sd, meta, tensors = dcae_fixture
    key = "encoder.stages.0.op_list.0.main.conv1.conv.weight"
    layer = key[: -len(".weight")]
    entry = lambda fmt: torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)  # noqa: E731
    scale = sd[key].abs().max() / 448
    new = dict(sd, **{key: (sd[key] / scale).to(torch.float8_e4m3fn), f"{layer}.weight_scale": scale,
                      f"{layer}.comfy_quant": entry("float8_e4m3fn")})
    model = load_dcae(_save(tmp_path / "new.safetensors", new))
    assert torch.equal(model.encoder.stages[0].op_list[0].main.conv1.conv.weight,
                       new[key].float() * scale)
    new[f"{layer}.comfy_quant"] = entry("nvfp4")
    with pytest.raises(CheckpointError, match="nvfp4"):
        load_dcae(_save(tmp_path / "nvfp4.safetensors", new))


def test_fp8_nan_is_refused_and_reported(tmp_path, dit_fixture):
    from jodi_core.__main__ import main

    sd = dict(dit_fixture[0])
    w = sd["blocks.0.attn.qkv.weight"].to(torch.float8_e4m3fn)
    w.view(torch.uint8)[0, 0] = 0x7F  # e4m3fn NaN
    sd["blocks.0.attn.qkv.weight"] = w
    path = _save(tmp_path / "nan.safetensors", sd)
    with pytest.raises(CheckpointError, match="NaN"):
        load_jodi(path)
    assert main(["info", str(path)]) == 0


def test_scaled_diffusers_dcae_and_hf_janus_dequantise_before_renaming(tmp_path, dcae_fixture):
    from jodi_core.dcae.keys import original_to_diffusers
    from jodi_core.janus import load_janus

    sd = dcae_fixture[0]
    diff = original_to_diffusers(sd)
    q_key = next(k for k in diff if k.endswith("attn.to_q.weight"))
    scale = diff[q_key].abs().max() / 448
    diff = dict(diff, **{q_key: (diff[q_key] / scale).to(torch.float8_e4m3fn),
                         q_key[: -len("weight")] + "scale_weight": scale, "scaled_fp8": torch.empty(0)})
    model = load_dcae(_save(tmp_path / "diffusers.safetensors", diff), weight_dtype="fp8_e4m3fn")
    assert model.encoder.stages[-1].op_list[0].context_module.main.qkv.conv.weight.dtype == torch.float8_e4m3fn

    folder = tmp_path / "Janus-Tiny-hf"
    write_tiny_janus(folder, layout="hf")
    hf = load_file(folder / "model.safetensors")
    k = "model.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    scale = hf[k].abs().max() / 448
    hf = dict(hf, **{k: (hf[k] / scale).to(torch.float8_e4m3fn), k[: -len("weight")] + "scale_weight": scale})
    _save(folder / "model.safetensors", hf)
    janus = load_janus(folder)
    qkv = janus.vision_model.vision_tower.blocks[0].attn.qkv.weight
    assert torch.equal(qkv[: qkv.shape[0] // 3], (hf[k].float() * scale).to(qkv.dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Host operations (ComfyUI passes comfy.ops.manual_cast or pick_operations' choice)
# ---------------------------------------------------------------------------------------------------------------------


class FakeHostOps:
    """Like comfy.ops.manual_cast: torch layers (dtype/device kwargs) that cast weight and bias on use."""

    class Linear(nn.Linear):
        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return nn.functional.linear(x, self.weight.to(x.dtype), bias)

    class Conv2d(nn.Conv2d):
        def forward(self, x):
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return self._conv_forward(x, self.weight.to(x.dtype), bias)


class FakeScaledHostOps(FakeHostOps):
    """Like comfy.ops.scaled_fp8_ops: Linear layers carry a scale_weight parameter."""

    class Linear(nn.Linear):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scale_weight = nn.Parameter(torch.ones((), device=self.weight.device), requires_grad=False)

        def forward(self, x):
            w = self.weight.to(x.dtype) * self.scale_weight.to(x.dtype)
            return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))


@pytest.mark.parametrize("host", [FakeHostOps, FakeScaledHostOps], ids=["manual_cast", "scaled_fp8_ops"])
def test_host_operations_build_the_model_and_store_fp8(dit_fixture, host):
    sd, overrides, meta, tensors = dit_fixture
    ref = _dit(sd, overrides, dtype=torch.bfloat16)
    model = _dit(sd, overrides, dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn", operations=host)
    qkv = model.blocks[0].attn.qkv
    assert type(qkv) is host.Linear and qkv.weight.dtype == torch.float8_e4m3fn
    assert hasattr(qkv, "scale_weight") == (host is FakeScaledHostOps)
    assert type(model.blocks[0].mlp.inverted_conv.conv) is host.Conv2d
    worst = max(_rel(_run_dit(model, tensors, c["name"]), _run_dit(ref, tensors, c["name"])) for c in meta["cases"])
    # plain casts lose more on small weights than CastOps' scaled storage (measured 0.06 / 0.04)
    assert worst < (0.12 if host is FakeHostOps else DIT_REL["fp8_e4m3fn"]), worst
    default = _dit(sd, overrides, dtype=torch.bfloat16, operations=host)  # host ops, default: 16-bit weights
    assert default.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


def test_castops_is_a_layer_namespace():
    x = torch.randn(2, 8, 16)
    for name, args in (("Linear", (8, 4)), ("LayerNorm", (8,)), ("Embedding", (10, 8))):
        ours, theirs = getattr(ops.CastOps, name)(*args), getattr(nn, name)(*args)
        assert isinstance(ours, getattr(nn, name))
        theirs.load_state_dict(ours.state_dict())
        inp = torch.randint(0, 10, (3,)) if name == "Embedding" else x[..., :8]
        assert torch.equal(ours(inp), theirs(inp))
    gn, conv = ops.CastOps.GroupNorm(2, 4), ops.CastOps.Conv2d(4, 6, 3, padding=1)
    img = torch.randn(1, 4, 5, 5)
    assert conv(gn(img)).shape == (1, 6, 5, 5)


@pytest.mark.parametrize("stored_dtype", [torch.float8_e4m3fn, torch.float32], ids=["fp8", "same-as-input"])
def test_scaled_weight_is_applied_without_touching_the_stored_weight(stored_dtype):
    # The scale multiplies the cast copy in place; where no copy is made (stored in the input's dtype) it must not.
    layer = ops.CastOps.Linear(8, 4)
    layer.weight.data = layer.weight.data.to(stored_dtype)
    layer.scale_weight = torch.tensor(0.5)
    stored = layer.weight.detach().clone()
    x = torch.randn(3, 8)
    expected = F.linear(x, stored.float() * 0.5, layer.bias)
    for _ in range(2):
        assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.equal(layer.weight.float(), stored.float())


# ---------------------------------------------------------------------------------------------------------------------
# fp8 matmuls (fp8_e4m3fn_fast)
# ---------------------------------------------------------------------------------------------------------------------


def test_fast_path_falls_back_on_cpu_with_one_log_line(dit_fixture, caplog):
    sd, overrides, meta, tensors = dit_fixture
    cast = _dit(sd, overrides, dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn")
    fast = _dit(sd, overrides, dtype=torch.bfloat16, weight_dtype="fp8_e4m3fn_fast")
    flagged = [m for m in fast.modules() if getattr(m, "fp8_compute", False)]
    assert flagged and fast.blocks[0].attn.qkv in flagged and fast.blocks[0].mlp.point_conv.conv in flagged
    assert not any(getattr(m, "fp8_compute", False) for m in cast.modules())
    ops._logged.clear()
    with caplog.at_level(logging.INFO, logger="jodi_core.ops"):
        for case in meta["cases"][:2]:
            assert torch.equal(_run_dit(fast, tensors, case["name"]), _run_dit(cast, tensors, case["name"]))
    lines = [r.getMessage() for r in caplog.records if "fp8 matmuls are not supported on cpu" in r.getMessage()]
    assert len(lines) == 1, lines


def test_fast_path_math_with_scaled_mm(monkeypatch):
    """The _scaled_mm glue (transpose, per-tensor scales, bias, leading dims), run where torch has a CPU kernel."""
    torch.manual_seed(0)
    with torch.device("meta"):
        lin, conv = ops.CastOps.Linear(64, 32), ops.CastOps.Conv2d(64, 48, 1)
    for layer, shape in ((lin, (32, 64)), (conv, (48, 64, 1, 1))):
        sd = {"weight": torch.randn(shape) * 0.05, "bias": torch.randn(shape[0]) * 0.1}
        sd = fp8.prepare_state_dict(layer, sd, fp8.Scales(), what="test", weight_dtype="fp8_e4m3fn",
                                    dtype=torch.bfloat16)
        layer.load_state_dict(sd, assign=True)
        layer.requires_grad_(False)
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    cast = lin(x), conv.pointwise_linear(x)
    assert torch.equal(cast[1], conv(x.permute(0, 2, 1)[..., None]).squeeze(-1).permute(0, 2, 1))
    monkeypatch.setattr(ops, "fp8_matmul_supported", lambda device: True)
    lin.fp8_compute = conv.fp8_compute = True
    try:
        fast = lin(x), conv.pointwise_linear(x)
    except RuntimeError as e:  # pragma: no cover (a torch without CPU _scaled_mm)
        pytest.skip(f"no CPU torch._scaled_mm: {e}")
    if not lin.fp8_compute:
        pytest.skip("this torch has no CPU torch._scaled_mm")
    for a, b in zip(fast, cast):
        assert a.shape == b.shape and a.dtype == torch.bfloat16
        assert 0 < _rel(a, b) < 0.05  # the input's per-tensor fp8 rounding, measured 0.025


# ---------------------------------------------------------------------------------------------------------------------
# convert: every kind in every dtype, loaded back with the normal loaders
# ---------------------------------------------------------------------------------------------------------------------

CONVERT_DTYPES = ("fp8_e4m3fn", "fp8_e5m2", "bf16", "fp16")


def _equal_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _expected(load, dtype: str, rest: torch.dtype):
    if dtype in ("bf16", "fp16"):
        return load(dtype=getattr(torch, {"bf16": "bfloat16", "fp16": "float16"}[dtype]))
    return load(dtype=rest, weight_dtype=dtype)


@pytest.mark.parametrize("dtype", CONVERT_DTYPES)
def test_convert_round_trips_dit_and_dcae(tmp_path, dtype):
    from jodi_core.__main__ import main
    from jodi_core.checkpoint import read_metadata
    from jodi_core.jobs.demo import DEMO_DIT, DEMO_VAE

    for src, load in ((DEMO_DIT, load_jodi), (DEMO_VAE, load_dcae)):
        out = tmp_path / f"{src.stem}.{dtype}.safetensors"
        assert main(["convert", str(src), str(out), "--dtype", dtype]) == 0
        md = read_metadata(out)
        assert json.loads(md["config"]) and md["jodi_dtype"] == dtype
        back = load(out, weight_dtype=dtype if dtype.startswith("fp8") else "default")
        expected = _expected(lambda **kw: load(src, **kw), dtype, torch.float16)  # the demo files are fp16
        _equal_state(back, expected)
        assert back.config == expected.config
        if dtype.startswith("fp8"):
            raw = load_file(out)
            assert raw["scaled_fp8"].dtype == ops.storage_dtype(dtype)
            assert not any(v.dtype == ops.storage_dtype(dtype) and ("norm" in k or k.endswith(".bias"))
                           for k, v in raw.items())
            ref, dequantised = load(src, dtype=torch.float16), load(out)  # default: fp8 file computes in fp16
            assert {p.dtype for p in dequantised.parameters()} == {torch.float16}
            assert _rel(torch.cat([p.float().flatten() for p in dequantised.parameters()]),
                        torch.cat([p.float().flatten() for p in ref.parameters()])) < 0.1


def test_convert_plain_layout_and_refusals(tmp_path):
    from jodi_core.jobs.convert import convert
    from jodi_core.jobs.demo import DEMO_DIT

    out = convert(DEMO_DIT, tmp_path / "plain.safetensors", "fp8_e4m3fn", layout="plain")
    raw = load_file(out)
    assert "scaled_fp8" not in raw and not any(k.endswith("scale_weight") for k in raw)
    assert raw["blocks.0.attn.qkv.weight"].dtype == torch.float8_e4m3fn
    model = load_jodi(out, weight_dtype="fp8_e4m3fn")
    assert model.blocks[0].attn.qkv.scale_weight is None  # plain fp8 stays plain
    with pytest.raises(ValueError, match="overwrite"):
        convert(out, out, "bf16")
    with pytest.raises(ValueError, match="dtype"):
        convert(DEMO_DIT, tmp_path / "x.safetensors", "int8")
    with pytest.raises(CheckpointError, match="neither"):
        convert(_save(tmp_path / "other.safetensors", {"foo.weight": torch.zeros(2)}), tmp_path / "y.safetensors",
                "bf16")


@pytest.mark.parametrize("layout", ["original", "hf"])
def test_convert_round_trips_a_janus_folder(tmp_path, layout):
    from jodi_core.jobs.convert import convert
    from jodi_core.janus import load_janus

    src = write_tiny_janus(tmp_path / "Janus-Tiny", layout=layout)
    for dtype in CONVERT_DTYPES:
        out = convert(src, tmp_path / f"Janus-Tiny-{dtype}", dtype)
        assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
        assert not (out / "pytorch_model.bin").exists()
        back = load_janus(out, weight_dtype=dtype if dtype.startswith("fp8") else "default")
        _equal_state(back, _expected(lambda **kw: load_janus(src, **kw), dtype, torch.bfloat16))  # fp32 source
        with torch.no_grad():
            ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
            assert back(ids).shape == (1, 8, TINY_CONFIG.language.vocab_size)
    with pytest.raises(ValueError, match="overwrite"):
        convert(src, src, "bf16")
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="already holds weights"):
        convert(src, stale, "bf16")
