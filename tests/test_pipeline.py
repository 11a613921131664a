"""End to end on tiny random models (CPU, seconds): the three jobs, seeds, batches, sizes and bad input."""

import pytest
import torch

from jodi_core.jobs.demo import tiny_random_models
from jodi_core.domains import DOMAIN_NAMES
from jodi_core.pipeline import Interrupted, JodiPipeline

G, C, I = "generate", "condition", "ignore"


@pytest.fixture(scope="module")
def pipe():
    dit, vae = tiny_random_models()
    return JodiPipeline(dit, vae)


def _caption(pipe, rows=1, valid=7):
    cc = pipe.transformer.config.caption_channels
    emb = torch.randn(rows, 1, 300, cc)
    mask = torch.zeros(rows, 300, dtype=torch.long)
    mask[:, :valid] = 1
    return emb, mask


def test_joint_generation_decodes_all_eight_domains(pipe):
    emb, mask = _caption(pipe)
    out = pipe([G] * 8, 64, 64, prompt_embeds=emb, prompt_mask=mask, steps=3, seed=1)
    assert set(out.images) == set(DOMAIN_NAMES)
    for name, img in out.images.items():
        assert img.shape == (1, 3, 64, 64), name
        assert 0 <= img.min() and img.max() <= 1
    assert out.seg_index.shape == (1, 64, 64) and out.seg_index.max() < 12
    assert out.latents.shape == (1, 8, 8, 8, 8)


def test_controllable_generation_keeps_condition_latents(pipe):
    depth = torch.rand(1, 3, 80, 48)
    out = pipe([G, I, I, C, I, I, I, I], 64, 64, conditions={"depth": depth}, steps=2)
    assert set(out.images) == {"image", "depth"}
    clean = pipe.prepare_conditions(out.roles, {"depth": depth}, 64, 64)
    torch.testing.assert_close(out.latents[:, 3], clean[:, 3])


def test_perception_ignores_the_prompt(pipe):
    photo = torch.rand(1, 3, 64, 64)
    emb, mask = _caption(pipe)
    a = pipe([C] + [G] * 7, 64, 64, conditions={"image": photo}, steps=2, decode=False)
    b = pipe([C] + [G] * 7, 64, 64, conditions={"image": photo}, prompt_embeds=emb, prompt_mask=mask, steps=2,
             decode=False)
    assert torch.equal(a.latents, b.latents)


def test_seeds_are_per_sample_and_independent_of_batch(pipe):
    batch = pipe([G] * 8, 64, 64, steps=2, seed=5, batch_size=2, decode=False)
    single = pipe([G] * 8, 64, 64, steps=2, seed=6, decode=False)
    torch.testing.assert_close(batch.latents[1], single.latents[0], atol=1e-5, rtol=0)
    again = pipe([G] * 8, 64, 64, steps=2, seed=5, batch_size=2, decode=False)
    assert torch.equal(batch.latents, again.latents)


def test_seeds_wrap_around_at_the_top_of_the_range():
    top = 2**64 - 1
    noise = JodiPipeline.make_noise(2, (2, 4, 4), top)  # the largest seed a node accepts, with a batch of 2
    assert torch.equal(noise[0], JodiPipeline.make_noise(1, (2, 4, 4), top)[0])
    assert torch.equal(noise[1], JodiPipeline.make_noise(1, (2, 4, 4), 0)[0])


def test_outputs_come_back_at_the_requested_size(pipe):
    out = pipe([G] + [I] * 6 + [G], 50, 70, steps=1)
    assert out.images["image"].shape == (1, 3, 50, 70)
    assert out.images["openpose"].shape == (1, 3, 50, 70)


def test_callback_and_interrupt(pipe):
    seen = []
    pipe([G] * 8, 64, 64, steps=3, decode=False, callback=lambda i, x0, x, n: seen.append((i, n)))
    assert seen == [(0, 3), (1, 3), (2, 3)]
    with pytest.raises(Interrupted):
        pipe([G] * 8, 64, 64, steps=3, should_stop=lambda: True)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(roles=[G, C] + [I] * 6), "'lineart' has the role 'condition' but no lineart image"),
        (dict(roles=[G] * 7), "Expected 8 roles"),
        (dict(roles=[G] * 7 + [5]), r"outside \{0, 1, 2\}"),
        (dict(roles=[G, C] + [I] * 6, conditions={"lineart": torch.full((1, 3, 8, 8), float("nan"))}), "NaN"),
        (dict(roles=[G] * 8, height=60, snap_to_bucket=False), "not a multiple of 8"),
        (dict(roles=[G] * 8, steps=0), "steps must be a positive integer"),
        (dict(roles=[G, C] + [I] * 6, conditions={"lineart": torch.rand(3, 8, 8)}), r"\(B, 3, H, W\)"),
        (dict(roles=[G] * 8, prompt_embeds=torch.full((1, 1, 300, 32), float("nan"))), "NaN"),
        # caught before they reach torch.cat / F.interpolate
        (dict(roles=[G] * 8, prompt_embeds=torch.zeros(1, 77, 32)), r"shape \(B, 300, 32\) for this model"),
        (dict(roles=[G] * 8, prompt_embeds=torch.zeros(1, 300, 48)), r"shape \(B, 300, 32\) for this model"),
        (dict(roles=[G] * 8, prompt_embeds=torch.zeros(1, 300, 32), negative_embeds=torch.zeros(1, 300, 48)),
         r"negative_embeds must have shape"),
        (dict(roles=[G] * 8, prompt_embeds=torch.zeros(1, 300, 32), prompt_mask=torch.full((1, 300), float("nan"))),
         "only 0 .padding. and 1"),
        (dict(roles=[G] * 8, prompt_embeds=torch.zeros(1, 300, 32), prompt_mask=torch.ones(1, 77)),
         r"prompt_mask must be \(B, 300\)"),
        (dict(roles=[G] * 8, height=64.5), "output height must be a positive integer, got 64.5"),
        (dict(roles=[G] * 8, width=True), "output width must be a positive integer"),
    ],
)
def test_bad_input_gets_a_clear_error(pipe, kwargs, match):
    args = dict(height=64, width=64, steps=1)
    args.update(kwargs)
    roles = args.pop("roles")
    with pytest.raises(ValueError, match=match):
        pipe(roles, **args)


@pytest.mark.parametrize("kwargs,match", [
    (dict(conditions={"lineart": torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)}),
     "float image in .0, 1., got torch.uint8"),
    (dict(conditions={"lineart": torch.rand(1, 3, 8, 8)}, prompt_embeds=torch.zeros(1, 300, 32, dtype=torch.long)),
     "prompt_embeds must be a float tensor"),
])
def test_wrong_kinds_of_tensor_are_type_errors(pipe, kwargs, match):
    with pytest.raises(TypeError, match=match):
        pipe([G, C] + [I] * 6, 64, 64, steps=1, **kwargs)


def test_cfg_rule_and_working_memory(pipe):
    joint, perceive = ["generate"] * 8, ["condition"] + ["generate"] * 7
    assert JodiPipeline.uses_cfg(joint, True, 4.5)
    assert not JodiPipeline.uses_cfg(joint, False, 4.5) and not JodiPipeline.uses_cfg(joint, True, 1.0)
    assert not JodiPipeline.uses_cfg(perceive, True, 4.5)  # perception drops the caption: no second branch
    one = pipe.working_memory(1, joint, 64, 64, use_cfg=False)
    assert pipe.working_memory(2, joint, 64, 64, use_cfg=True) == 4 * one  # 2 samples x 2 branches
    depth_only = ["condition", "ignore", "ignore", "generate"] + ["ignore"] * 4
    assert pipe.working_memory(1, depth_only, 64, 64, use_cfg=False) < one  # ignored domains take no tokens


def test_condition_fit_and_one_encode_per_condition_image(pipe, monkeypatch):
    from jodi_core import imaging
    from jodi_core.domains import parse_roles

    depth = torch.rand(1, 3, 40, 72)
    roles = parse_roles([G, I, I, C, I, I, I, I], batch=3)
    rows = []
    real_encode = pipe.encode

    def counting_encode(images, **kw):
        rows.append(images.shape[0])
        return real_encode(images, **kw)

    monkeypatch.setattr(pipe, "encode", counting_encode)
    stretched = pipe.prepare_conditions(roles, {"depth": depth}, 64, 64, fit="stretch")
    assert rows == [1]  # one condition image for 3 rows is encoded once
    expected = real_encode(imaging.resize(depth, 64, 64))[0]
    assert all(torch.allclose(stretched[b, 3], expected, atol=1e-6) for b in range(3))
    cropped = pipe.prepare_conditions(roles, {"depth": depth}, 64, 64)  # the reference's crop by default
    assert torch.allclose(cropped[0, 3], real_encode(imaging.resize_and_crop(depth, 64, 64))[0], atol=1e-6)
    assert not torch.allclose(cropped, stretched)
    with pytest.raises(ValueError, match="condition_fit must be one of"):
        pipe.prepare_conditions(roles, {"depth": depth}, 64, 64, fit="pad")


def test_role_and_caption_state_is_prepared_once_per_run(pipe, monkeypatch):
    """r0 and every block's caption K/V come from one ``prepare`` per sampling run, not one per step or branch."""
    calls = []
    real_prepare = pipe.transformer.prepare

    def counting(*args, **kwargs):
        calls.append(1)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(pipe.transformer, "prepare", counting)
    caption = torch.randn(1, 300, pipe.transformer.config.caption_channels)
    pipe([G] * 8, 64, 64, steps=4, prompt_embeds=caption, cfg_scale=4.5, decode=False)  # CFG: two branches
    assert len(calls) == 1


def test_memory_estimate_grows_with_the_output_size_and_the_maps(pipe):
    joint = [G] * 8
    sizes = (512, 1024, 2048, 4096, 8192)
    host = [pipe.memory_needs(1, joint, s, s, use_cfg=False)[torch.device("cpu")] for s in sizes]
    assert all(a < b for a, b in zip(host, host[1:]))
    assert host[-1] > 8192**2 * 8 * 12  # at least the 8 maps as float32 RGB
    one_map = pipe.memory_needs(1, [G] + [I] * 7, 8192, 8192, use_cfg=False)[torch.device("cpu")]
    assert one_map < host[-1] / 3
    assert pipe.memory_needs(2, joint, 8192, 8192, use_cfg=False)[torch.device("cpu")] > 1.9 * host[-1]
    gpu = pipe.memory_needs(1, joint, 8192, 8192, use_cfg=True, dit_device="cuda", vae_device="cuda")
    assert set(gpu) == {torch.device("cuda"), torch.device("cpu")}  # the maps come back to RAM in any case


def test_a_run_that_cannot_fit_is_refused_before_it_allocates(pipe, monkeypatch):
    from jodi_core import memory
    from jodi_core.memory import InsufficientMemoryError

    monkeypatch.setattr(memory, "available_memory", lambda device: 2 << 30)  # 2 GB free
    for step in ("prepare_conditions", "make_noise", "sample", "decode_latents"):
        monkeypatch.setattr(pipe, step, lambda *a, **k: pytest.fail("the run started before the memory check"))
    with pytest.raises(InsufficientMemoryError, match=r"Not enough RAM .*8192x8192 output, 8 maps.*smaller output "
                                                      r"size.*fewer maps") as err:
        pipe([G] * 8, 8192, 8192, steps=1)
    assert isinstance(err.value, MemoryError)
    monkeypatch.setenv("JODI_MEMORY_CHECK", "0")  # the escape hatch: the run goes ahead (here: into the stub)
    with pytest.raises(pytest.fail.Exception, match="before the memory check"):
        pipe([G] * 8, 8192, 8192, steps=1)


def test_free_memory_readers():
    from jodi_core import memory

    free = memory.available_memory("cpu")
    assert free is None or free > 0
    assert memory.available_memory("meta") is None  # unknown devices are not checked
    memory.check_fits({torch.device("cpu"): 1}, "a tiny run")
    memory.check_fits({torch.device("meta"): 1 << 62}, "an unknown device")
