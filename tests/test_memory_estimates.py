"""The estimates the nodes give ComfyUI (load_models_gpu's memory_required): one for the DiT step, one for the
decode, each growing with what it works on, so ComfyUI frees or offloads the right amount before each phase."""

from __future__ import annotations

import pytest
import torch

from jodi_core.dcae.model import DCAE
from jodi_core.domains import NUM_DOMAINS, plan_roles
from jodi_core.pipeline import JodiPipeline

GPU = torch.device("cuda")  # a device name only: keeps the model's share apart from the host's (no GPU needed)


@pytest.fixture(scope="module")
def pipe():
    """The released shapes (1.6 B DiT at 1024 px, DC-AE f32c32) on the meta device: estimates read shapes only."""
    from jodi_core.dit.model import JodiTransformer

    with torch.device("meta"):
        return JodiPipeline(JodiTransformer(dtype=torch.bfloat16), DCAE(dtype=torch.bfloat16))


def _step(pipe, batch=1, size=1024, cfg=False, active=NUM_DOMAINS, aspect=1.0, device=GPU) -> int:
    roles = ["generate"] * active + ["ignore"] * (NUM_DOMAINS - active)
    plan = plan_roles(roles, batch)
    return pipe.memory_needs(batch, plan, size, int(size * aspect), cfg, decode=False, dit_device=GPU,
                             vae_device=GPU)[torch.device(device)]


def _decode(pipe, batch=1, size=1024, maps=NUM_DOMAINS, tile=None, work=None, device=GPU) -> int:
    plan = plan_roles(["generate"] * NUM_DOMAINS, batch)
    return pipe.memory_needs(batch, plan, size, size, False, decode=True, encode=False, decode_rows=1,
                             decoded=list(range(maps)), vae_device=GPU, work_size=work or pipe.working_size(size, size),
                             tiled_decode=tile is not None, tile_size=tile)[torch.device(device)]


def test_step_estimate_grows_with_size_batch_cfg_and_domains(pipe):
    base = _step(pipe)
    # Jodi samples at the aspect bucket of its training size (about 1024 x 1024 px whatever the output size): the
    # step needs what the bucket takes, the output size only adds to the latents kept in RAM.
    assert _step(pipe, size=2048) == base and _step(pipe, size=512, aspect=2.0) != base
    assert _step(pipe, size=2048, device="cpu") == _step(pipe, device="cpu")
    assert _step(pipe, batch=2) > base * 1.9
    assert _step(pipe, cfg=True) > base * 1.9  # CFG doubles the rows
    assert _step(pipe, active=2) < base / 3  # ignored domains leave the sequence
    assert _step(pipe, batch=2, cfg=True) > _step(pipe, batch=2) > _step(pipe)


def test_step_estimate_follows_the_size_when_not_snapped(pipe):
    """Without the aspect buckets (``snap=False``) the DiT works at the size asked for, and so does its estimate
    (it used to stay at the 1024 px bucket: a 2048 px run was estimated at a quarter of its tokens)."""
    plan = plan_roles(["generate"] * NUM_DOMAINS, 1)

    def step(size):
        return pipe.memory_needs(1, plan, size, size, False, decode=False, snap=False, dit_device=GPU,
                                 vae_device=GPU)[GPU]

    assert step(1024) == _step(pipe)
    assert step(2048) > 3.5 * step(1024) and step(1024) > 3 * step(512)
    assert pipe.working_memory(1, plan, 2048, 2048, False, snap=False) > 3.5 * pipe.working_memory(
        1, plan, 2048, 2048, False)


def test_decode_estimate_grows_with_size_and_maps_and_shrinks_with_tiles(pipe):
    base = _decode(pipe, size=1024)
    assert _decode(pipe, work=(2048, 2048)) > base * 3  # the decoder works at the latent's size
    assert _decode(pipe, size=2048, device="cpu") > 3 * _decode(pipe, size=1024, device="cpu")  # maps at output size
    assert _decode(pipe, maps=1, device="cpu") < _decode(pipe, device="cpu") / 3
    # One sample and one map at a time on the device: what the decoder holds does not grow with the batch or the
    # maps, only the maps the device keeps at the output size do (on a GPU they go to RAM).
    assert _decode(pipe, size=1024, batch=4) == base
    assert _decode(pipe, size=1024, maps=1) == base
    assert _decode(pipe, work=(2048, 2048), tile=1024) < _decode(pipe, work=(2048, 2048))
    assert _decode(pipe, tile=1024) == base  # a 1024 px latent is one 1024 px tile
    assert _decode(pipe, tile=512) < base / 2


def test_decode_alone_leaves_out_the_step_and_the_encoding(pipe):
    plan = plan_roles(["condition"] + ["generate"] * (NUM_DOMAINS - 1), 1)
    kwargs = dict(decode=True, decode_rows=1, dit_device=GPU, vae_device=GPU)
    whole = pipe.memory_needs(1, plan, 1024, 1024, False, **kwargs)[GPU]
    decode_only = JodiPipeline(None, pipe.vae).memory_needs(1, plan, 1024, 1024, False, encode=False,
                                                            work_size=pipe.working_size(1024, 1024), **kwargs)[GPU]
    assert decode_only <= whole
    assert decode_only == _decode(pipe, size=1024)
    # The latent's own size is what a decode works at, whatever bucket the output size would snap to.
    small = JodiPipeline(None, pipe.vae).memory_needs(1, plan, 1024, 1024, False, encode=False,
                                                      work_size=(256, 256), **kwargs)[GPU]
    assert small < decode_only


def test_fp8_weights_add_the_cast_copy_of_their_largest_weight(pipe):
    """Cast on use makes a compute-dtype copy of an fp8 weight while its layer runs: the step and the decode
    reserve room for the largest one (the released DiT: its 2240 x 8960 feed-forward weights in bf16)."""
    from jodi_core import fp8
    from jodi_core.dit.model import JodiTransformer

    with torch.device("meta"):
        stored = JodiPipeline(JodiTransformer(dtype=torch.bfloat16), DCAE(dtype=torch.bfloat16))
    largest = {}
    for name, module, what in (("dit", stored.transformer, "Jodi DiT"), ("vae", stored.vae, "DC-AE")):
        for key in fp8.fp8_layers(module, what):
            p = module.get_parameter(key)
            p.data = torch.empty(p.shape, dtype=torch.float8_e4m3fn, device="meta")
        largest[name] = max(p.numel() for p in module.parameters() if p.dtype == torch.float8_e4m3fn) * 2
    assert _step(stored) - _step(pipe) == largest["dit"]
    assert _decode(stored) - _decode(pipe) == largest["vae"]
    assert _decode(stored, tile=256) - _decode(pipe, tile=256) == largest["vae"]
    assert 2 ** 20 < largest["vae"] < largest["dit"] < 2 ** 27
