"""Full official sampling runs (DPM-Solver++ with CFG) on the tiny DiT: the plain path and the pipeline shortcuts.

Iterates over whatever settings ``sampler_tiny.json`` lists, so another fixture set of the same schema can be
dropped in through ``JODI_FIXTURES``.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from jodi_core.loading import jodi_from_state_dict
from jodi_core.pipeline import JodiPipeline
from jodi_core.sampling import cfg_velocity, flow_timesteps, sample_dpmpp_2m

from conftest import fixture_config_overrides

# Suggested tolerances of the fixture README.
ATOL_SAMPLE = 2e-3
ATOL_X0_FIRST, ATOL_X0 = 1e-2, 2e-3
ATOL_MODEL_OUT = 5e-4


def _load(fixtures_dir):
    meta = json.loads((fixtures_dir / "sampler_tiny.json").read_text())
    tensors = load_file(fixtures_dir / "sampler_tiny.safetensors")
    sd = load_file(fixtures_dir / meta["weights"])
    model = jodi_from_state_dict(sd, dtype=torch.float32, attention_backend="torch",
                                 **fixture_config_overrides(fixtures_dir))
    return meta, tensors, model


@pytest.fixture(scope="module")
def fixture(fixtures_dir):
    return _load(fixtures_dir)


def _settings(fixtures_dir):
    meta = json.loads((fixtures_dir / "sampler_tiny.json").read_text())
    return [s["name"] for s in meta["settings"]]


def pytest_generate_tests(metafunc):
    if "setting" in metafunc.fixturenames:
        from conftest import FIXTURES_DIR

        metafunc.parametrize("setting", _settings(FIXTURES_DIR))


def _inputs(tensors, name):
    get = lambda k: tensors[f"{name}.{k}"]  # noqa: E731
    return dict(
        z=get("z"), y=get("caption_embs"), null_y=get("null_y"), mask=get("emb_masks"), role=get("role"),
        clean_x=get("clean_x"), steps=int(get("steps")), cfg=float(get("cfg_scale")), shift=float(get("flow_shift")),
    )


def test_plain_path_matches_official_trace(fixture, setting):
    """The reference call per step: the model's own CFG tiling of role/mask/clean_x, guidance on [uncond, cond]."""
    _, t, model = fixture
    s = _inputs(t, setting)
    xs, x0s, outs = [], [], []

    def velocity(x, time):
        xs.append(x.clone())
        timestep = (1000 * time).expand(2 * x.shape[0])
        out = model(torch.cat([x, x]), timestep, torch.cat([s["null_y"], s["y"]]), s["role"], s["mask"], s["clean_x"])
        outs.append(out)
        v_uncond, v_cond = out.chunk(2)
        return cfg_velocity(v_uncond, v_cond, s["cfg"])

    sample = sample_dpmpp_2m(
        velocity, s["z"], flow_timesteps(s["steps"], s["shift"]), callback=lambda i, x0, x, n: x0s.append(x0)
    )
    final = torch.where((s["role"] == 1)[:, :, None, None, None], s["clean_x"], sample)

    torch.testing.assert_close(sample, t[f"{setting}.sample"], atol=ATOL_SAMPLE, rtol=0)
    torch.testing.assert_close(final, t[f"{setting}.final"], atol=ATOL_SAMPLE, rtol=0)
    if f"{setting}.trace.x" in t:
        for i, x in enumerate(xs):
            torch.testing.assert_close(x, t[f"{setting}.trace.x"][i], atol=ATOL_SAMPLE, rtol=0)
    if f"{setting}.trace.x0_pred" in t:
        for i, x0 in enumerate(x0s):
            atol = ATOL_X0_FIRST if i == 0 else ATOL_X0
            torch.testing.assert_close(x0, t[f"{setting}.trace.x0_pred"][i], atol=atol, rtol=0)
    if f"{setting}.trace.model_out" in t:
        for i, out in enumerate(outs):
            torch.testing.assert_close(out, t[f"{setting}.trace.model_out"][i], atol=ATOL_MODEL_OUT, rtol=0)


def test_pipeline_shortcuts_match_official_final(fixture, setting):
    """Pruned ignored domains, prepared context (r0 and caption K/V once per run), no CFG branch for perception:
    identical results on every slot that is not ignored."""
    _, t, model = fixture
    s = _inputs(t, setting)
    pipe = JodiPipeline(model, vae=None)
    final = pipe.sample(
        s["role"], s["clean_x"], s["z"], prompt_embeds=s["y"], prompt_mask=s["mask"], negative_embeds=s["null_y"],
        steps=s["steps"], cfg_scale=s["cfg"], flow_shift=s["shift"],
    )
    kept = (s["role"] != 2)[:, :, None, None, None].expand_as(final)
    assert kept.any()
    torch.testing.assert_close(final[kept], t[f"{setting}.final"][kept], atol=ATOL_SAMPLE, rtol=0)


def test_perception_needs_no_cfg_branch(fixture):
    """With the image as a condition the caption is dropped, so guidance is a no-op: one branch gives the same
    sample as the official two-branch run (the fixture's perception setting)."""
    meta, t, model = fixture
    names = [s["name"] for s in meta["settings"] if s["role"][0] == 1]
    if not names:
        pytest.skip("no perception setting in this fixture set")
    s = _inputs(t, names[0])
    pipe = JodiPipeline(model, vae=None)
    rows = []
    real_forward = model.forward_prepared

    def counting_forward(x, *args, **kwargs):
        rows.append(x.shape[0])
        return real_forward(x, *args, **kwargs)

    model.forward_prepared = counting_forward
    try:
        other_caption = torch.randn_like(s["y"])
        a = pipe.sample(s["role"], s["clean_x"], s["z"], prompt_embeds=s["y"], prompt_mask=s["mask"],
                        steps=s["steps"])
        b = pipe.sample(s["role"], s["clean_x"], s["z"], prompt_embeds=other_caption, steps=s["steps"])
    finally:
        del model.forward_prepared
    assert torch.equal(a, b)
    assert rows and all(n == s["z"].shape[0] for n in rows)  # one branch per step: no unconditional copy
