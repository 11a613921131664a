"""The training loop: role sampling, flow-matching loss, loss decrease, exact resume, config files, outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EXAMPLE_DATA_DIR
from jodi_core.jobs.train import trainer as trainer_module  # where the loop looks its helpers up
from jodi_core.jobs.train import (
    CONDITION,
    GENERATE,
    IGNORE,
    DataConfig,
    Deadline,
    TrainConfig,
    flow_matching_loss,
    lr_scale,
    main_train,
    sample_roles,
    sample_sigmas,
    train,
)

# Small enough for 2 CPU cores: DC-AE with compression 4 (32 px -> 8x8 latents), a 2-block DiT.
MICRO_DCAE = dict(latent_channels=32, width_list=[8, 16, 32], encoder_depth_list=[1, 1, 1],
                  decoder_depth_list=[1, 1, 1], encoder_block_types=["ResBlock"] * 3,
                  decoder_block_types=["ResBlock"] * 3)
MICRO_DIT = dict(hidden_size=64, depth=2, num_heads=2, caption_channels=16, model_max_length=4, base_size=8)


def _config(tmp_path, **kw) -> TrainConfig:
    base = dict(output_dir=str(tmp_path / "run"), data=DataConfig(size=32), batch_size=3, dcae=MICRO_DCAE,
                transformer=MICRO_DIT, dcae_images_per_step=8, dcae_lr=2e-3, dit_lr=1e-3, progress=False,
                device="cpu")
    base.update(kw)
    return TrainConfig(**base).validate()


@pytest.fixture()
def example_data(tmp_path):
    if not (EXAMPLE_DATA_DIR / "metadata.jsonl").is_file():
        pytest.skip(f"example dataset not found at {EXAMPLE_DATA_DIR}")
    dst = tmp_path / "joint"
    shutil.copytree(EXAMPLE_DATA_DIR, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------------------
# Role sampling
# ---------------------------------------------------------------------------------------------------------------------


def test_role_sampler_matches_the_paper_marginals():
    n = 30000
    g = torch.Generator().manual_seed(0)
    roles, task = sample_roles(torch.ones(n, 8, dtype=torch.bool), g, return_tasks=True)
    assert roles.shape == (n, 8) and roles.dtype == torch.long
    # Tasks 1/3 each; image generated in joint and controllable, a condition in perception.
    np.testing.assert_allclose(torch.bincount(task, minlength=3).numpy() / n, [1 / 3] * 3, atol=0.012)
    assert ((roles[:, 0] == CONDITION) == (task == 2)).all()
    assert (roles[:, 0] != IGNORE).all()
    labels = roles[:, 1:]
    # Marginals per label (reference analysis): P(generate) = 1/3 + 1/3 * 64/127, P(condition) = 1/6.
    p_gen = 1 / 3 + (1 / 3) * 64 / 127
    p_cond = 1 / 6
    freq = [(labels == r).float().mean(0) for r in (GENERATE, CONDITION, IGNORE)]
    np.testing.assert_allclose(freq[0].numpy(), p_gen, atol=0.015)
    np.testing.assert_allclose(freq[1].numpy(), p_cond, atol=0.012)
    np.testing.assert_allclose(freq[2].numpy(), 1 - p_gen - p_cond, atol=0.015)
    # Per task: joint generates everything; controllable never generates labels; perception never conditions one,
    # and never ignores them all.
    assert (labels[task == 0] == GENERATE).all()
    assert (labels[task == 1] != GENERATE).all()
    np.testing.assert_allclose((labels[task == 1] == CONDITION).float().mean().item(), 0.5, atol=0.01)
    p = labels[task == 2]
    assert (p != CONDITION).all() and (p == GENERATE).any(1).all()
    # Perception rows are uniform over the 127 allowed patterns.
    codes = ((p == GENERATE).long() * (2 ** torch.arange(7))).sum(1)
    counts = torch.bincount(codes, minlength=128)
    assert counts[0] == 0
    expected = len(p) / 127
    assert (counts[1:] - expected).abs().max() < 5 * expected**0.5


def test_missing_labels_are_always_ignored():
    g = torch.Generator().manual_seed(1)
    available = torch.ones(4000, 8, dtype=torch.bool)
    available[:, 7] = False  # no openpose
    available[:2000, 1:] = False  # half the rows have no label at all
    roles, task = sample_roles(available, g, return_tasks=True)
    assert (roles[:, 7] == IGNORE).all()
    assert (roles[:2000, 1:] == IGNORE).all()
    # Without labels there is nothing to perceive: such rows generate the image.
    assert (roles[:2000, 0] == GENERATE).all() and (task[:2000] != 2).all()
    assert (task[2000:] == 2).any()
    with pytest.raises(ValueError, match="image"):
        sample_roles(torch.zeros(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        sample_roles(torch.ones(2, 7, dtype=torch.bool))


def test_sigmas_are_shifted_logit_normal():
    g = torch.Generator().manual_seed(0)
    s = sample_sigmas(20000, 3.0, g)
    assert (s > 0).all() and (s < 1).all()
    # The median of logit-normal(0, 1) is 1/2; the shift maps it to 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert abs(s.median().item() - 0.75) < 0.01
    u = torch.sigmoid(torch.randn(20000, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(s, 3 * u / (1 + 2 * u))


def test_loss_counts_generated_domains_only():
    B, L, C, h, w = 2, 8, 4, 2, 2
    x0, noise = torch.randn(B, L, C, h, w), torch.randn(B, L, C, h, w)
    roles = torch.tensor([[0, 1, 2, 0, 2, 2, 2, 2], [1, 0, 2, 2, 2, 2, 2, 2]])
    sigmas = torch.tensor([0.3, 0.9])
    seen = {}

    def model(x_t, timestep, y, role, mask, clean_x):
        seen.update(x_t=x_t, timestep=timestep, clean_x=clean_x)
        out = noise - x0 + 5.0  # wrong everywhere by 5 ...
        gen = (role == GENERATE)[:, :, None, None, None]
        return torch.where(gen, noise - x0 + 1.0, out)  # ... but by 1 on generated domains

    loss = flow_matching_loss(model, x0, roles, sigmas, noise)
    assert loss.item() == pytest.approx(1.0)
    s = sigmas[:, None, None, None, None]
    torch.testing.assert_close(seen["x_t"], (1 - s) * x0 + s * noise)
    torch.testing.assert_close(seen["timestep"], sigmas * 1000)
    torch.testing.assert_close(seen["clean_x"], x0)


# ---------------------------------------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------------------------------------


def test_finetune_on_example_data_reduces_both_losses(tmp_path, example_data):
    cfg = _config(tmp_path, data=DataConfig(kind="joint", root=str(example_data), size=32, fixed_batch=True),
                  fixed_noise=True, dcae_steps=10, dit_steps=10)
    result = train(cfg)
    d, t = result.dcae_losses, result.dit_losses
    assert len(d) == 10 and len(t) == 10
    assert np.mean(d[-3:]) < 0.75 * d[0], d
    assert np.mean(t[-3:]) < 0.75 * t[0], t
    assert result.scaling_factor > 0
    summary = json.loads((cfg_out := tmp_path / "run" / "train_summary.json").read_text())
    assert summary["scaling_factor"] == pytest.approx(result.scaling_factor)
    assert cfg_out.parent.joinpath("last.pt").is_file()

    # The outputs load with the package's own loaders, as the official key layouts.
    from jodi_core.checkpoint import read_state_dict
    from jodi_core.loading import identify_checkpoint
    from jodi_core.dcae.model import DCAE
    from jodi_core.loading import jodi_from_state_dict

    jsd = read_state_dict(result.transformer_path)
    assert identify_checkpoint(jsd) == "jodi"
    model = jodi_from_state_dict(jsd, num_heads=2, base_size=8)
    assert model.config.hidden_size == 64 and model.config.depth == 2
    dsd = read_state_dict(result.dcae_path)
    assert identify_checkpoint(dsd) == "dcae"
    assert DCAE.from_state_dict(dsd).config.width_list == (8, 16, 32)


def test_initial_weights_keep_their_stored_config(tmp_path):
    """A run started from exported weights builds the same models (base_size and head count come from the file's
    metadata; the default ``transformer`` config would give other positional embeddings) and the same latent scale."""
    from jodi_core.loading import load_jodi
    from jodi_core.jobs.train import Trainer

    first = train(_config(tmp_path / "a", dcae_steps=2, dit_steps=1))
    cfg = TrainConfig(output_dir=str(tmp_path / "b"), data=DataConfig(size=32), batch_size=2, dcae_steps=0,
                      dit_steps=1, progress=False, device="cpu", dcae_checkpoint=str(first.dcae_path),
                      transformer_checkpoint=str(first.transformer_path))
    trainer = Trainer(cfg)
    assert cfg.transformer["base_size"] != MICRO_DIT["base_size"]
    reference = load_jodi(first.transformer_path, dtype=torch.float32)
    assert trainer.transformer.config == reference.config and trainer.transformer.config.base_size == 8
    assert trainer.scaling_factor == pytest.approx(first.scaling_factor)
    assert all(p.requires_grad for p in trainer.transformer.parameters())
    assert all(p.requires_grad for p in trainer.dcae.parameters())
    result = trainer.run()
    assert len(result.dit_losses) == 1 and result.scaling_factor == pytest.approx(first.scaling_factor)


def test_resume_reproduces_the_next_losses(tmp_path):
    common = dict(data=DataConfig(size=32), dcae_steps=3, save_every=2)
    straight = train(_config(tmp_path / "a", dit_steps=4, **common))
    # Stop after 2 DiT steps, then resume to 4 with a fresh process state.
    first = train(_config(tmp_path / "b", dit_steps=2, **common))
    torch.manual_seed(12345)
    np.random.seed(999)
    resumed = train(_config(tmp_path / "b", dit_steps=4, **common))
    assert first.dit_losses == straight.dit_losses[:2]
    assert resumed.dit_losses[:2] == first.dit_losses  # the history comes back with the checkpoint
    np.testing.assert_allclose(resumed.dit_losses[2:], straight.dit_losses[2:], rtol=1e-5)
    state = torch.load(tmp_path / "b" / "run" / "last.pt", weights_only=True)
    assert state["stage"] == "dit" and state["step"] == 4 and "rng" in state and "dit_opt" in state


def test_config_files_and_command_line(tmp_path):
    cfg = _config(tmp_path, dcae_steps=1, dit_steps=1)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg.to_dict()))
    assert TrainConfig.from_file(path) == cfg
    yml = tmp_path / "cfg.yaml"
    yml.write_text("batch_size: 2\ndata:\n  size: 32\n")
    loaded = TrainConfig.from_file(yml)
    assert loaded.batch_size == 2 and loaded.data.size == 32
    with pytest.raises(ValueError, match="Unknown training config keys: bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="data.root"):
        TrainConfig.from_dict({"data": {"kind": "joint"}})
    with pytest.raises(ValueError, match="caption_encoder"):
        train(_config(tmp_path, caption_dropout=0.5))
    assert main_train(["--config", str(path), "--output-dir", str(tmp_path / "cli"), "--dit-steps", "2"]) == 0
    assert (tmp_path / "cli" / "jodi.safetensors").is_file()
    state = torch.load(tmp_path / "cli" / "last.pt", weights_only=True)
    assert state["step"] == 2


def test_caption_dropout_mixes_text_and_null_captions(tmp_path, monkeypatch):
    seen_captions, seen_y = [], []

    def encoder(captions):
        seen_captions.append(list(captions))
        B = len(captions)
        return torch.randn(B, 4, 16) + 5.0, torch.tensor([[1, 1, 0, 0]] * B)  # far from the null embedding

    real_loss = trainer_module.flow_matching_loss

    def spy(model, x0, roles, sigmas, noise, y=None, mask=None):
        seen_y.append(y.detach().clone())
        return real_loss(model, x0, roles, sigmas, noise, y, mask)

    monkeypatch.setattr(trainer_module, "flow_matching_loss", spy)

    def null_rows(result_dir) -> tuple[int, int]:
        from jodi_core.loading import load_jodi

        null = load_jodi(result_dir / "jodi.safetensors").y_embedder.y_embedding.float()
        rows = torch.cat([y[:, 0] for y in seen_y])  # (steps * B, 4, 16)
        # The null embedding is trained too, so compare with the encoder's offset instead of exact values.
        is_null = (rows.mean(dim=(1, 2)) - null.mean()).abs() < 1.0
        return int(is_null.sum()), rows.shape[0]

    result = train(_config(tmp_path / "half", caption_dropout=0.5, dcae_steps=1, dit_steps=6), caption_encoder=encoder)
    assert len(seen_captions) == 6 and all(isinstance(c, str) and c for c in seen_captions[0])
    n_null, n = null_rows(result.output_dir)
    assert 0 < n_null < n, (n_null, n)  # both kinds of rows
    assert all(np.isfinite(result.dit_losses))
    seen_y.clear()
    result = train(_config(tmp_path / "none", caption_dropout=0.0, dcae_steps=1, dit_steps=2), caption_encoder=encoder)
    assert null_rows(result.output_dir)[0] == 0  # no dropout: every row is the encoder's caption


def test_lr_schedule_warmup_then_cosine():
    assert [lr_scale(s, 10, warmup=4) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    cosine = [lr_scale(s, 10, warmup=2, schedule="cosine", min_ratio=0.1) for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cosine[2:], cosine[3:]))  # decays monotonically after warm-up
    assert cosine[2 + 7 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 3 / 7)))
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="linear").validate()
    with pytest.raises(ValueError, match="min_lr_ratio"):
        TrainConfig(min_lr_ratio=2.0).validate()


class _FakeClock:
    """``time.monotonic`` that advances ``tick`` seconds per call, so a time budget ends at a known step."""

    def __init__(self, tick: float):
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_deadline_maps_the_remaining_budget_onto_a_stage(monkeypatch):
    clock = _FakeClock(tick=0.0)
    monkeypatch.setattr(trainer_module.time, "monotonic", clock)
    deadline = Deadline(max_minutes=1.0)
    clock.now += 20  # a third of the budget went on something before the stage (another stage, start-up)
    assert not deadline.reached()
    by_clock = deadline.stage_clock(start_step=100, total=200)
    assert by_clock() == 100
    clock.now += 20  # half of what was left
    assert not deadline.reached() and by_clock() == 150
    clock.now += 20
    assert deadline.reached() and by_clock() == 200
    unlimited = Deadline(None)
    assert not unlimited.reached()
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes=0).validate()


def test_max_minutes_stops_relaunches_resume_and_the_schedule_never_rises(tmp_path, monkeypatch):
    # Every clock reading advances 6 s: with max_minutes 0.25 (15 s), each launch runs a few steps, then saves.
    monkeypatch.setattr(trainer_module.time, "monotonic", _FakeClock(tick=6.0))
    lrs = []
    real_step = trainer_module.Trainer.dit_step

    def record_lr(self, batch, model):
        out = real_step(self, batch, model)
        lrs.append(self.dit_opt.param_groups[0]["lr"])
        return out

    monkeypatch.setattr(trainer_module.Trainer, "dit_step", record_lr)
    cfg = dict(data=DataConfig(size=32), dcae_steps=3, dit_steps=6, save_every=100, max_minutes=0.25,
               lr_schedule="cosine", warmup_steps=2)
    first = train(_config(tmp_path, **cfg))
    assert not first.finished and first.dcae_path is None and first.transformer_path is None  # in the DC-AE stage
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert state["stage"] == "dcae" and 0 < state["step"] < 3
    results = []
    while not results or not results[-1].finished:
        assert len(results) < 20, "the relaunches make no progress"
        results.append(train(_config(tmp_path, **cfg)))
    stopped_in_dit = [r for r in results if r.transformer_path is not None and not r.finished]
    assert stopped_in_dit, "some launch should stop inside the DiT stage"
    assert all(r.transformer_path.is_file() for r in stopped_in_dit)  # weights exported even when out of time
    final = results[-1]
    assert len(final.dcae_losses) == 3 and len(final.dit_losses) == 6  # every step ran once across the launches
    assert lrs[:2] == pytest.approx([0.5e-3, 1e-3])  # the warm-up is never skipped by the clock
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))  # after it, relaunches never push the lr back up
    assert json.loads((tmp_path / "run" / "train_summary.json").read_text())["finished"] is True


def test_train_command_exits_3_when_stopped_by_the_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_module.time, "monotonic", _FakeClock(tick=60.0))
    config = tmp_path / "c.json"
    config.write_text(json.dumps({**_config(tmp_path).to_dict(), "dcae_steps": 2, "dit_steps": 2, "max_minutes": 1}))
    assert main_train(["--config", str(config)]) == 3


def test_config_types_are_checked():
    with pytest.raises(ValueError, match="dit_steps"):
        TrainConfig(dit_steps=1.5).validate()
    with pytest.raises(ValueError, match="max_minutes"):
        TrainConfig(max_minutes="30").validate()
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=True).validate()
    with pytest.raises(ValueError, match="dit_lr"):
        TrainConfig(dit_lr=-1e-4).validate()


def test_training_size_must_fit_the_autoencoder(tmp_path):
    with pytest.raises(ValueError, match="multiple of the DC-AE's compression 4"):
        train(_config(tmp_path, data=DataConfig(size=30)))


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.json")),
                         ids=lambda p: p.name)
def test_shipped_training_configs_are_valid(path):
    cfg = TrainConfig.from_file(path)
    for key in ("dcae_checkpoint", "transformer_checkpoint"):
        ref = getattr(cfg, key)
        assert ref is None or (path.parents[1] / ref).is_file(), f"{path.name}: {key} {ref} does not exist"
