"""Parity of the Jodi DiT with the official forward, on every case listed by the golden fixture set.

Data-driven: the cases, config and tapped tensors all come from ``dit_tiny_cases.json`` / ``dit_tiny_weights.json``,
so the same test runs unchanged on another fixture set of the same schema (point JODI_FIXTURES at it).
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from jodi_core.dit.model import JodiConfig, JodiTransformer

from conftest import fixture_config_overrides

ATOL = 1e-4  # fixture README: DiT out and taps (threading alone moves the official numbers by ~2e-6)


def _load(fixtures_dir):
    cases_meta = json.loads((fixtures_dir / "dit_tiny_cases.json").read_text())
    sd = load_file(fixtures_dir / cases_meta.get("weights", "dit_tiny_weights.safetensors"))
    config = JodiConfig.from_state_dict(sd, **fixture_config_overrides(fixtures_dir))
    model = JodiTransformer(config, attention_backend="torch").eval()
    model.load_state_dict(sd, strict=True)
    return model, cases_meta, load_file(fixtures_dir / "dit_tiny_cases.safetensors")


@pytest.fixture(scope="module")
def parity(fixtures_dir):
    return _load(fixtures_dir)


def _case_names(fixtures_dir_path):
    meta = json.loads((fixtures_dir_path / "dit_tiny_cases.json").read_text())
    return [c["name"] for c in meta["cases"]]


def pytest_generate_tests(metafunc):
    if "case_name" in metafunc.fixturenames:
        from conftest import FIXTURES_DIR

        names = _case_names(FIXTURES_DIR) if (FIXTURES_DIR / "dit_tiny_cases.json").is_file() else []
        metafunc.parametrize("case_name", names)


def _inputs(tensors, name):
    return {k: tensors[f"{name}.{k}"] for k in ("x", "timestep", "y", "mask", "role", "clean_x")}


def test_config_matches_fixture(parity, fixtures_dir):
    model, _, _ = parity
    ref = json.loads((fixtures_dir / "dit_tiny_weights.json").read_text())["config"]
    cfg = model.config
    assert (cfg.hidden_size, cfg.depth, cfg.caption_channels, cfg.in_channels, cfg.patch_size) == (
        ref["hidden_size"], ref["depth"], ref["caption_channels"], ref["in_channels"], ref["patch_size"])
    assert cfg.num_domains == ref["num_conditions"] + 1
    assert cfg.mlp_hidden_size == int(ref["hidden_size"] * ref["mlp_ratio"])
    assert cfg.model_max_length == ref["model_max_length"]


@torch.no_grad()
def test_forward_matches_official(parity, case_name):
    model, _, tensors = parity
    inp = _inputs(tensors, case_name)
    out = model(inp["x"], inp["timestep"], inp["y"], role=inp["role"], mask=inp["mask"], clean_x=inp["clean_x"])
    # All slots, the garbage of role-1/role-2 domains included: the maths is the same, so they match too.
    torch.testing.assert_close(out, tensors[f"{case_name}.out"], atol=ATOL, rtol=0)


@torch.no_grad()
def test_pos_embed_taps(parity):
    model, meta, tensors = parity
    taps = [k for k in tensors if k.endswith(".tap.pos_embed")]
    assert taps, "the fixture set has no positional-embedding tap"
    for key in taps:
        pe = tensors[key][0]
        x = tensors[key.replace(".tap.pos_embed", ".x")]
        h, w = x.shape[-2] // model.config.patch_size, x.shape[-1] // model.config.patch_size
        ours = model.pos_embed(h, w, torch.device("cpu"), torch.float32)
        torch.testing.assert_close(ours, pe, atol=ATOL, rtol=0)


@torch.no_grad()
def test_intermediate_taps(parity):
    """Localise a mismatch: time/role embeddings, caption tokens, block inputs and outputs of the tapped case."""
    model, meta, tensors = parity
    tapped = sorted({k.split(".tap.")[0] for k in tensors if ".tap." in k and not k.endswith(".tap.pos_embed")})
    assert tapped, "the fixture set has no tapped case"
    for name in tapped:
        inp = _inputs(tensors, name)
        taps = {k.split(".tap.")[1]: v for k, v in tensors.items() if k.startswith(f"{name}.tap.")}
        seen = {}
        hooks = [
            model.t_embedder.register_forward_hook(lambda m, a, o: seen.__setitem__("t_emb", o)),
            model.t_block.register_forward_hook(lambda m, a, o: seen.__setitem__("t0", o)),
            model.role_block.register_forward_hook(lambda m, a, o: seen.__setitem__("r0", o)),
            model.attention_y_norm.register_forward_hook(lambda m, a, o: seen.__setitem__("y_tokens", o[:, None])),
            model.blocks[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("blocks_in", a[0])),
        ]
        for i, block in enumerate(model.blocks):
            hooks.append(block.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(f"block{i}_out", o)))
        try:
            model(inp["x"], inp["timestep"], inp["y"], role=inp["role"], mask=inp["mask"], clean_x=inp["clean_x"])
        finally:
            for hk in hooks:
                hk.remove()
        compared = 0
        for key, ref in taps.items():
            if key not in seen:
                continue
            torch.testing.assert_close(seen[key].reshape(ref.shape), ref, atol=ATOL, rtol=0, msg=f"{name}.tap.{key}")
            compared += 1
        assert compared >= 5, f"only {compared} taps of {name} were compared: {sorted(taps)}"


@torch.no_grad()
def test_prepared_path_matches_official(parity, case_name):
    """The pruned inference path equals the official output on every generated slot that is not ignored."""
    model, _, tensors = parity
    inp = _inputs(tensors, case_name)
    N = inp["x"].shape[0]
    role = inp["role"].repeat(2, 1) if 2 * inp["role"].shape[0] == N else inp["role"]
    ctx = model.prepare(inp["role"], inp["y"], inp["mask"])
    out = model.forward_prepared(inp["x"], inp["timestep"], ctx, clean_x=inp["clean_x"])
    ref = tensors[f"{case_name}.out"]
    keep = (role == 0)[:, :, None, None, None].expand_as(ref)
    assert keep.any()
    torch.testing.assert_close(out[keep], ref[keep], atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["torch", "auto"])
@torch.no_grad()
def test_forward_matches_official_on_cuda(parity, backend, monkeypatch):
    """Same cases on the GPU; ``auto`` runs the Triton linear attention when it is available."""
    import copy

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu_model, meta, tensors = parity
    model = copy.deepcopy(cpu_model).cuda()
    model.attention_backend = backend
    for case in meta["cases"]:
        name = case["name"]
        inp = {k: v.cuda() for k, v in _inputs(tensors, name).items()}
        out = model(inp["x"], inp["timestep"], inp["y"], role=inp["role"], mask=inp["mask"], clean_x=inp["clean_x"])
        torch.testing.assert_close(out.cpu(), tensors[f"{name}.out"], atol=ATOL, rtol=0, msg=name)
