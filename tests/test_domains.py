"""Domain registry, roles and post-processing against the official post-processors (postprocess fixture)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from jodi_core.domains import (
    DOMAIN_NAMES,
    DOMAINS,
    Role,
    RolePlan,
    ade150_to_seg12,
    controllable_roles,
    get_domain,
    index_to_seg,
    joint_roles,
    parse_roles,
    perception_roles,
    plan_roles,
    postprocess_depth,
    seg_palette,
    seg_to_index,
)

# Flattened positions of the deliberate near-tie pixels in struct sample 1 (fixture README §4).
TIE_PIXELS = slice(163, 563)


def pytest_generate_tests(metafunc):
    """The cases are the fixture's own: every ``<prefix>.input`` and the post-processed tensors listed beside it."""
    if "prefix" not in metafunc.fixturenames:
        return
    from conftest import FIXTURES_DIR

    names = {t["name"] for t in json.loads((FIXTURES_DIR / "postprocess.json").read_text())["tensors"]}
    prefixes = sorted(n.removesuffix(".input") for n in names if n.endswith(".input"))
    assert prefixes, "postprocess.json lists no <prefix>.input tensor"
    if "domain" in metafunc.fixturenames:
        metafunc.parametrize("prefix,domain", [(p, d) for p in prefixes for d in DOMAIN_NAMES if f"{p}.{d}" in names])
    elif "scheme" in metafunc.fixturenames:
        metafunc.parametrize("prefix,scheme,key", [(p, f"colors{n}", f"seg{n}") for p in prefixes for n in (12, 150)
                                                   if f"{p}.seg{n}.index" in names])
    else:
        metafunc.parametrize("prefix", prefixes)


@pytest.fixture(scope="module")
def post(fixtures_dir):
    meta = json.loads((fixtures_dir / "postprocess.json").read_text())
    return meta, load_file(fixtures_dir / "postprocess.safetensors")


def test_official_domain_order():
    assert DOMAIN_NAMES == ("image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose")
    assert [d.index for d in DOMAINS] == list(range(8))
    assert get_domain("segmentation").metadata_key == "annotation_seg_12colors"
    assert get_domain("seg").name == "segmentation" and get_domain(3).name == "depth"


def test_postprocess_matches_official(post, prefix, domain):
    _, t = post
    out = get_domain(domain).postprocess(t[f"{prefix}.input"])
    torch.testing.assert_close(out, t[f"{prefix}.{domain}"], atol=1e-6, rtol=0)


def test_segmentation_matches_official(post, prefix, scheme, key):
    _, t = post
    x = t[f"{prefix}.input"]
    index = seg_to_index(x, scheme)
    # The same distance formula as the reference, so even the deliberate ties must agree.
    assert torch.equal(index, t[f"{prefix}.{key}.index"])
    torch.testing.assert_close(index_to_seg(index, scheme), t[f"{prefix}.{key}"], atol=1e-6, rtol=0)


def test_palettes_match_fixture(post):
    _, t = post
    assert torch.equal(seg_palette("colors12"), t["palette.colors12"])
    assert torch.equal(seg_palette("colors150"), t["palette.colors150_with_black"])
    assert torch.equal(ade150_to_seg12(), t["palette.map150to12"])


def test_constant_depth_is_mid_grey_not_nan():
    # The reference divides by (max - min) and returns NaN for a constant map; we return 0.5 (documented deviation).
    x = torch.full((1, 3, 4, 4), 0.3)
    out = postprocess_depth(x)
    assert not torch.isnan(out).any()
    assert torch.all(out == 0.5)


def test_postprocess_rejects_out_of_range_and_nan():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        get_domain("image").postprocess(torch.full((1, 3, 2, 2), 1.5))
    with pytest.raises(ValueError, match="NaN"):
        get_domain("depth").postprocess(torch.full((1, 3, 2, 2), float("nan")))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        get_domain("normal").postprocess(torch.zeros(3, 2, 2))


def test_parse_roles_accepts_names_ints_and_tables():
    assert parse_roles(["generate"] * 8).tolist() == [[0] * 8]
    assert parse_roles([1, 0, 0, 2, 0, 0, 0, 0], batch=2).shape == (2, 8)
    assert parse_roles(torch.tensor([[Role.CONDITION] + [Role.GENERATE] * 7])).tolist() == [[1] + [0] * 7]


@pytest.mark.parametrize(
    "roles,match",
    [
        ([0] * 7, "Expected 8 roles"),
        ([0] * 9, "Expected 8 roles"),
        ([3] + [0] * 7, r"outside \{0, 1, 2\}"),
        (["maybe"] + [0] * 7, "Unknown role"),
        ([2] * 8, "Every domain is ignored"),
        ([1] + [2] * 7, "No domain is set to generate"),
        (torch.tensor([[0, 0, 0, 0, 0, 0, 0, -1]]), r"outside \{0, 1, 2\}"),
        (torch.zeros(2, 7, dtype=torch.long), "8 entries"),
    ],
)
def test_parse_roles_errors(roles, match):
    with pytest.raises(ValueError, match=match):
        parse_roles(roles)


def test_parse_roles_batch_mismatch():
    with pytest.raises(ValueError, match="rows of roles for a batch of 3"):
        parse_roles(torch.zeros(2, 8, dtype=torch.long), batch=3)


# ---------------------------------------------------------------------------------------------------------------------
# The role plan and the standard rows
# ---------------------------------------------------------------------------------------------------------------------

G, C, I = Role.GENERATE, Role.CONDITION, Role.IGNORE


def test_standard_rows():
    assert joint_roles() == (G,) * 8
    assert perception_roles() == (C,) + (G,) * 7
    assert perception_roles(["depth", "seg"]) == (C, I, I, G, I, I, G, I)
    assert controllable_roles(["edge", "depth"]) == (G, I, C, C, I, I, I, I)
    assert controllable_roles(["openpose"], "generate") == (G,) * 7 + (C,)
    with pytest.raises(ValueError, match="Unknown domain"):
        perception_roles(["height"])


def test_perception_plan_drops_the_caption_and_never_runs_cfg():
    plan = plan_roles(perception_roles(["depth", "normal"]), batch=2, has_prompt=True, cfg_scale=4.5)
    assert plan.batch == 2 and plan.roles.tolist() == [[1, 2, 2, 0, 0, 2, 2, 2]] * 2
    assert plan.active == (0, 3, 4) and plan.generated == (3, 4) and plan.conditioned == (0,)
    assert plan.drops_caption.tolist() == [True, True] and plan.caption_dropped
    assert not plan.use_cfg  # the prompt would only reach a caption that is dropped


def test_joint_plan_runs_cfg_only_with_a_prompt_and_a_scale_other_than_one():
    assert plan_roles(joint_roles(), has_prompt=True, cfg_scale=4.5).use_cfg
    assert not plan_roles(joint_roles(), has_prompt=False, cfg_scale=4.5).use_cfg
    assert not plan_roles(joint_roles(), has_prompt=True, cfg_scale=1.0).use_cfg
    plan = plan_roles(joint_roles())
    assert plan.active == plan.generated == tuple(range(8)) and plan.conditioned == ()
    assert not plan.caption_dropped and not plan.drops_caption.any()


def test_mixed_rows_drop_the_caption_per_row_and_keep_cfg():
    plan = plan_roles([list(perception_roles(["depth"])), list(controllable_roles(["edge"]))], has_prompt=True,
                      cfg_scale=2.0)
    assert plan.drops_caption.tolist() == [True, False] and not plan.caption_dropped and plan.use_cfg
    assert plan.active == (0, 2, 3) and plan.generated == (0, 3) and plan.conditioned == (0, 2)


def test_a_plan_is_taken_as_it_is_and_repeated_to_the_batch(monkeypatch):
    from jodi_core import domains

    plan = plan_roles(controllable_roles(["depth"]), has_prompt=True, cfg_scale=4.5)
    monkeypatch.setattr(domains, "parse_roles", lambda *a, **k: pytest.fail("a plan is parsed again"))
    three = plan_roles(plan, batch=3, has_prompt=True, cfg_scale=4.5)
    assert three.batch == 3 and torch.equal(three.roles, plan.roles.repeat(3, 1)) and three.use_cfg
    assert not plan_roles(three, has_prompt=False).use_cfg  # the guidance is the caller's
    with pytest.raises(ValueError, match="rows of roles for a batch of 2"):
        plan_roles(three, batch=2)


def test_plan_from_a_table_takes_it_as_it_is():
    """The transformer plans the raw role tensors of the reference call, which need not name a generated domain."""
    plan = RolePlan.from_table(torch.tensor([[1, 1, 2, 2, 2, 2, 2, 2]]))
    assert plan.generated == () and plan.active == (0, 1) and plan.conditioned == (0, 1)
