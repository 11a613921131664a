"""Checkpoint loading: the official formats, dtypes, config inference, and clear errors for bad files."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jodi_core.checkpoint import CheckpointError, read_state_dict
from jodi_core.loading import identify_checkpoint, load_dcae, load_jodi


@pytest.fixture(scope="module")
def dit_sd(fixtures_dir):
    return load_file(fixtures_dir / "dit_tiny_weights.safetensors")


@pytest.fixture(scope="module")
def dcae_sd(fixtures_dir):
    return load_file(fixtures_dir / "dcae_tiny_weights.safetensors")


def _fixture_base_size(fixtures_dir):
    cfg = json.loads((fixtures_dir / "dit_tiny_weights.json").read_text())["config"]
    return cfg["input_size"] // cfg["patch_size"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_official_pth_layout_loads_in_any_dtype(tmp_path, fixtures_dir, dit_sd, dtype):
    # Jodi.pth is {'state_dict': ...} (plus training state); an old checkpoint may carry pos_embed.
    sd = {k: v.to(dtype) for k, v in dit_sd.items()}
    sd["pos_embed"] = torch.zeros(1, 64, 64, dtype=dtype)
    path = tmp_path / "Jodi.pth"
    torch.save({"state_dict": sd, "epoch": 3}, path)
    model = load_jodi(path, base_size=_fixture_base_size(fixtures_dir))
    assert next(model.parameters()).dtype == dtype
    assert model.config.hidden_size == 64 and model.config.depth == 2 and model.config.caption_channels == 48
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_safetensors_with_dtype_cast(tmp_path, dit_sd):
    path = tmp_path / "jodi.safetensors"
    save_file(dit_sd, path)
    model = load_jodi(path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert not any(p.is_meta for p in model.parameters())


def test_dcae_loads_in_both_key_formats(tmp_path, dcae_sd):
    from jodi_core.dcae.keys import original_to_diffusers

    save_file(dcae_sd, tmp_path / "original.safetensors")
    save_file({k: v.contiguous() for k, v in original_to_diffusers(dcae_sd).items()}, tmp_path / "diffusers.safetensors")
    a = load_dcae(tmp_path / "original.safetensors")
    b = load_dcae(tmp_path / "diffusers.safetensors")
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_dcae_attention_backend_reaches_every_attention_block(tmp_path, dcae_sd):
    from jodi_core.dcae.model import LiteMLA

    save_file(dcae_sd, tmp_path / "ae.safetensors")
    with pytest.raises(ValueError, match="Unknown attention backend 'flash'"):
        load_dcae(tmp_path / "missing.safetensors", attention_backend="flash")  # refused before any file is read
    model = load_dcae(tmp_path / "ae.safetensors", attention_backend="torch")
    blocks = [m for m in model.modules() if isinstance(m, LiteMLA)]
    assert blocks and model.attention_backend == "torch" and all(m.attention is model.attention for m in blocks)
    assert load_dcae(tmp_path / "ae.safetensors").attention_backend == "auto"


def test_truncated_and_corrupt_files(tmp_path, dit_sd):
    path = tmp_path / "jodi.safetensors"
    save_file(dit_sd, path)
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_jodi(tmp_path / "truncated.safetensors")
    torch.save({"state_dict": dit_sd}, tmp_path / "Jodi.pth")
    pth = (tmp_path / "Jodi.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(pth[: len(pth) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_jodi(tmp_path / "truncated.pth")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_jodi(tmp_path / "empty.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        load_jodi(tmp_path / "missing.safetensors")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="Unsupported checkpoint extension"):
        read_state_dict(tmp_path / "weights.onnx")


@pytest.mark.parametrize(
    "keys,family",
    [
        (["model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.label_emb.0.0.weight"], "SDXL"),
        (["double_blocks.0.img_attn.qkv.weight"], "Flux"),
        (["model.diffusion_model.input_blocks.0.0.weight"], "Stable Diffusion 1.x/2.x"),
        (["x_embedder.proj.weight", "blocks.0.attn.qkv.weight"], "Sana"),
        # UNet/DiT-only files (models/diffusion_models) and diffusers layouts
        (["input_blocks.0.0.weight", "label_emb.0.0.weight"], "SDXL"),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight", "add_embedding.linear_1.weight"], "SDXL"),
        (["input_blocks.0.0.weight"], "Stable Diffusion 1.x/2.x"),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "Stable Diffusion 1.x/2.x"),
        (["x_embedder.weight", "context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight",
          "single_transformer_blocks.0.proj_mlp.weight"], "Flux"),
        (["pos_embed.proj.weight", "context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight"], "SD3"),
        # a diffusers ControlNet carries a UNet's down_blocks (and SDXL's add_embedding): still a ControlNet
        (["conv_in.weight", "controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight",
          "controlnet_down_blocks.0.weight"], "ControlNet"),
        (["controlnet_cond_embedding.conv_in.weight", "down_blocks.0.resnets.0.conv1.weight",
          "add_embedding.linear_1.weight"], "ControlNet"),
        (["control_model.input_hint_block.0.weight", "control_model.input_blocks.0.0.weight"], "ControlNet"),
        (["language_model.model.embed_tokens.weight", "gen_vision_model.encoder.conv_in.weight"], "Janus"),
    ],
)
def test_a_checkpoint_of_another_model_is_named(tmp_path, keys, family):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.zeros(2, 2) for k in keys}, path)
    with pytest.raises(CheckpointError, match=f"looks like an? {family}"):
        load_jodi(path)


def test_dcae_file_in_the_jodi_loader_and_back(tmp_path, dit_sd, dcae_sd):
    save_file(dcae_sd, tmp_path / "vae.safetensors")
    save_file(dit_sd, tmp_path / "dit.safetensors")
    with pytest.raises(CheckpointError, match="looks like a DC-AE autoencoder .*Load Jodi DC-AE.*, not a Jodi DiT"):
        load_jodi(tmp_path / "vae.safetensors")
    with pytest.raises(CheckpointError, match="looks like a Jodi DiT .*Load Jodi Model.*, not a DC-AE"):
        load_dcae(tmp_path / "dit.safetensors")


def test_missing_unexpected_and_mismatched_keys_are_listed(tmp_path, dit_sd):
    sd = dict(dit_sd)
    del sd["blocks.1.attn.proj.bias"]
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["final_layers.3.linear.bias"] = torch.zeros(7)
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_jodi(tmp_path / "broken.safetensors")
    msg = str(e.value)
    assert "1 missing keys: blocks.1.attn.proj.bias" in msg
    assert "1 unexpected keys: blocks.0.extra.weight" in msg
    assert "final_layers.3.linear.bias: checkpoint (7,) vs model (32,)" in msg


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8])
def test_quantised_weights_are_refused_by_name(tmp_path, dit_sd, dtype):  # fp8 loads: tests/test_fp8.py
    sd = dict(dit_sd)
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].to(dtype)
    save_file(sd, tmp_path / "fp8.safetensors")
    with pytest.raises(CheckpointError, match=f"'blocks.0.attn.qkv.weight' is stored as {dtype}; quantised"):
        load_jodi(tmp_path / "fp8.safetensors")


def test_nan_weights_are_refused(tmp_path, dit_sd):
    sd = dict(dit_sd)
    sd["t_block.1.bias"] = torch.full_like(sd["t_block.1.bias"], float("nan"))
    save_file(sd, tmp_path / "nan.safetensors")
    with pytest.raises(CheckpointError, match="NaN"):
        load_jodi(tmp_path / "nan.safetensors")


def test_identify(dit_sd, dcae_sd):
    assert identify_checkpoint(dit_sd) == "jodi"
    assert identify_checkpoint(dcae_sd) == "dcae"
    assert identify_checkpoint({"foo": torch.zeros(1)}) is None


def test_the_demo_model_is_looked_for_in_the_shipped_assets():
    """Where the demo weights are looked for does not depend on which module asks (a wrong folder would only show as
    a silent fallback to random weights and skipped tests)."""
    from pathlib import Path

    from jodi_core.jobs.demo import DEMO_DIT, DEMO_VAE

    assets = Path(__file__).resolve().parents[1] / "jodi_core" / "assets" / "demo"
    assert DEMO_DIT.parent.resolve() == assets and DEMO_VAE.parent.resolve() == assets


def test_info_reports_the_stored_settings_of_the_demo_model(capsys):
    from jodi_core.__main__ import main
    from jodi_core.jobs.demo import DEMO_DIT, DEMO_VAE

    if not DEMO_DIT.is_file():
        pytest.skip("no demo model in this checkout")
    assert main(["info", str(DEMO_DIT)]) == 0
    out = capsys.readouterr().out
    assert "jodi," in out and f"base_size={load_jodi(DEMO_DIT).config.base_size}," in out
    assert main(["info", str(DEMO_VAE)]) == 0
    assert f"scaling_factor={load_dcae(DEMO_VAE).config.scaling_factor}" in capsys.readouterr().out


def test_info_reads_model_folders_and_warns_about_non_finite_weights(tmp_path, capsys, dcae_sd):
    from jodi_core.__main__ import main

    folder = tmp_path / "dc-ae-f32c32-sana-1.0"
    folder.mkdir()
    bad = dict(dcae_sd)
    first = sorted(bad)[0]
    bad[first] = bad[first].clone().fill_(float("nan"))
    _save(folder / "model.safetensors", bad)
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "model.safetensors: dcae," in out
    assert f"1 tensors hold NaN or inf values (the loaders refuse them): {first}" in out


def test_info_describes_a_quantised_file_instead_of_crashing(tmp_path, capsys, dit_sd):
    from jodi_core.__main__ import main

    sd = dict(dit_sd)
    sd["blocks.0.attn.qkv.weight"] = sd["blocks.0.attn.qkv.weight"].to(torch.float8_e4m3fn)
    save_file(sd, tmp_path / "fp8.safetensors")
    assert main(["info", str(tmp_path / "fp8.safetensors")]) == 0  # isfinite has no float8 kernel
    assert "float8_e4m3fn" in capsys.readouterr().out


def test_training_wrappers_rng_state_and_prefixes_load(tmp_path, fixtures_dir, dit_sd):
    import numpy as np

    base = _fixture_base_size(fixtures_dir)
    ref = load_jodi(_save(tmp_path / "plain.safetensors", dit_sd), base_size=base).state_dict()

    # The reference's training checkpoints: weights, EMA, optimizer step and the numpy RNG state (pickled arrays).
    full = tmp_path / "Jodi.pth"
    torch.save({"state_dict": dit_sd, "state_dict_ema": dit_sd, "step": torch.tensor(7),
                "rng_state": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()}}, full)
    ema_only = tmp_path / "ema.pth"
    torch.save({"ema": dit_sd, "epoch": 3}, ema_only)
    prefixed = _save(tmp_path / "ddp.safetensors", {f"module.{k}": v for k, v in dit_sd.items()})
    for path in (full, ema_only, prefixed):
        loaded = load_jodi(path, base_size=base).state_dict()
        assert all(torch.equal(loaded[k], ref[k]) for k in ref), path.name


def _save(path, sd):
    save_file({k: v.contiguous().clone() for k, v in sd.items()}, path)
    return path


def test_unsafe_pickles_and_training_checkpoints_get_short_clear_errors(tmp_path, dit_sd):
    pickled_module = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), pickled_module)
    with pytest.raises(CheckpointError, match=r"pickled objects that cannot be read safely \(torch.nn") as err:
        load_jodi(pickled_module)
    assert len(str(err.value)) < 400 and "\x1b" not in str(err.value)
    last = tmp_path / "last.pt"
    torch.save({"stage": "dit", "step": 3, "transformer": dit_sd, "dcae": {"w": torch.zeros(1)}}, last)
    with pytest.raises(CheckpointError, match="training checkpoint of jodi_core.jobs.train"):
        load_jodi(last)


def test_a_dit_with_another_domain_count_is_refused_at_load(tmp_path, dit_sd):
    extra = dict(dit_sd)
    n = 8
    extra["domain_embedding"] = torch.cat([dit_sd["domain_embedding"], dit_sd["domain_embedding"][:1]])
    for prefix in ("x_embedders", "final_layers"):
        extra.update({k.replace(f"{prefix}.0.", f"{prefix}.{n}."): v for k, v in dit_sd.items()
                      if k.startswith(f"{prefix}.0.")})
    with pytest.raises(CheckpointError, match="has 9 domains"):
        load_jodi(_save(tmp_path / "nine.safetensors", extra))


def test_pipeline_refuses_a_dcae_of_another_latent_width():
    from jodi_core.dcae.model import DCAE, DCAEConfig
    from jodi_core.jobs.demo import tiny_random_models
    from jodi_core.pipeline import JodiPipeline

    dit, vae = tiny_random_models()
    other = DCAE(DCAEConfig(**{**vars(vae.config), "latent_channels": vae.config.latent_channels * 2}))
    with pytest.raises(ValueError, match="latent channels but the DC-AE makes"):
        JodiPipeline(dit, other)


class _RunsCode:
    """Unpickling this writes a marker file: what a hostile checkpoint would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_refusals_never_pass_on_torchs_advice_to_load_unsafely(tmp_path, dit_sd, zipped):
    import traceback

    marker = tmp_path / "marker.txt"
    path = tmp_path / "Jodi.pth"
    torch.save({"state_dict": dit_sd, "hook": _RunsCode(marker)}, path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=r"cannot be read safely \(.*exec.*could run code") as err:
        load_jodi(path)
    assert not marker.exists()
    # The message and whatever a traceback shows with it (a chained torch error) advise nothing unsafe.
    text = "".join(traceback.format_exception(err.value))
    for phrase in ("weights_only", "Re-running", "trust", "can still be loaded", "add_safe_globals"):
        assert phrase not in text, phrase


def test_not_a_torch_file_is_named_as_such_without_torchs_advice(tmp_path):
    import pickle
    import traceback

    for name, data in (("junk.pth", b"not a checkpoint at all"), ("plain.pt", pickle.dumps({"a": 1}, protocol=4))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="corrupt, truncated or not a torch file") as err:
            read_state_dict(tmp_path / name)
        assert "weights_only" not in "".join(traceback.format_exception(err.value)), name


def test_every_torch_load_in_the_pack_is_weights_only():
    """Each ``torch.load(...)`` in jodi_core and nodes passes ``weights_only=True`` itself (never torch's default)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    calls = []
    for path in sorted([*(root / "jodi_core").rglob("*.py"), *(root / "nodes").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                flags = [k.value for k in node.keywords if k.arg == "weights_only"]
                calls.append((f"{path.relative_to(root)}:{node.lineno}", flags))
    assert calls
    unsafe = [where for where, flags in calls if len(flags) != 1 or not (isinstance(flags[0], ast.Constant)
                                                                         and flags[0].value is True)]
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"
