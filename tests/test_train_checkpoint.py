"""Training checkpoints (last.pt) are read safely: tensors and plain containers only, state restored exactly."""

from __future__ import annotations

import random
import traceback

import numpy as np
import pytest
import torch

from jodi_core.checkpoint import CheckpointError
from jodi_core.jobs.train import DataConfig, Trainer, TrainConfig

from test_train import MICRO_DCAE, MICRO_DIT  # the same micro models as the training tests


def _trainer(tmp_path, **kw) -> Trainer:
    cfg = dict(output_dir=str(tmp_path / "run"), data=DataConfig(size=32), batch_size=2, dcae=MICRO_DCAE,
               transformer=MICRO_DIT, dcae_images_per_step=4, progress=False, device="cpu", dcae_steps=1,
               dit_steps=1, scaling_factor=1.0)
    cfg.update(kw)
    return Trainer(TrainConfig(**cfg).validate())


class _RunsCode:
    """Unpickling this writes a marker file: what a hostile last.pt would do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


def _no_unsafe_advice(error: BaseException) -> None:
    text = "".join(traceback.format_exception(error))  # the message and any chained torch error shown with it
    for phrase in ("weights_only", "Re-running", "trust", "can still be loaded", "add_safe_globals"):
        assert phrase not in text, phrase


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_a_crafted_last_pt_is_refused_and_runs_no_code(tmp_path, zipped):
    trainer = _trainer(tmp_path)
    marker = tmp_path / "marker.txt"
    state = trainer.state_dict()
    state["losses"] = {"dcae": [_RunsCode(marker)], "dit": []}  # looks like a checkpoint in every other way
    torch.save(state, trainer.checkpoint_path, _use_new_zipfile_serialization=zipped)
    with pytest.raises(CheckpointError, match=r"can be resumed safely.*\(.*exec\).*could run code") as err:
        trainer.run()  # resume is on by default and last.pt exists
    assert not marker.exists()
    assert "jodi.safetensors" in str(err.value)  # says how to go on
    _no_unsafe_advice(err.value)


def test_save_then_resume_restores_optimizer_rng_and_schedule_exactly(tmp_path):
    first = _trainer(tmp_path)
    first.run()  # one DC-AE and one DiT step: both optimizers hold state
    first.schedule_pos = 5
    random.seed(11)
    np.random.seed(12)
    np.random.standard_normal()  # a cached Gaussian in numpy's state too
    torch.manual_seed(13)
    expected = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    first.save()
    # The file is tensors and plain containers only: torch's safe loader reads it with no allowlist.
    torch.load(first.checkpoint_path, weights_only=True)

    random.seed(0)
    np.random.seed(0)
    second = _trainer(tmp_path)  # seeds torch itself
    second.load(second.checkpoint_path)
    assert (second.stage, second.step, second.schedule_pos) == (first.stage, first.step, 5)
    assert torch.equal(torch.get_rng_state(), expected["torch"])
    assert random.getstate() == expected["python"]
    numpy_state = np.random.get_state()
    assert numpy_state[0] == expected["numpy"][0] and np.array_equal(numpy_state[1], expected["numpy"][1])
    assert numpy_state[2:] == expected["numpy"][2:]
    for name in ("dcae_opt", "dit_opt"):
        a, b = getattr(first, name).state_dict(), getattr(second, name).state_dict()
        assert a["param_groups"] == b["param_groups"]
        assert a["state"].keys() == b["state"].keys() and a["state"]
        for k in a["state"]:
            for field, value in a["state"][k].items():
                assert torch.equal(value, b["state"][k][field]), (name, k, field)
    assert second.losses == first.losses


def test_a_last_pt_of_the_previous_format_still_resumes(tmp_path):
    old = _trainer(tmp_path)
    state = old.state_dict()
    state.pop("format")
    np.random.seed(3)
    state["rng"]["numpy"] = np.random.get_state()  # numpy's tuple with its array, as earlier versions saved it
    torch.save(state, old.checkpoint_path)
    np.random.seed(4)
    _trainer(tmp_path).load(old.checkpoint_path)
    np.random.seed(3)
    assert np.array_equal(np.random.get_state()[1], state["rng"]["numpy"][1])


def test_files_that_are_not_our_checkpoints_get_clear_errors(tmp_path):
    trainer = _trainer(tmp_path)
    path = trainer.checkpoint_path
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    with pytest.raises(CheckpointError, match=r"not a jodi_core training checkpoint \(no 'stage'"):
        trainer.load(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"cannot be resumed from: .*corrupt, truncated or not a torch file"):
        trainer.load(path)
    torch.save([1, 2, 3], path)
    with pytest.raises(CheckpointError, match="not a jodi_core training checkpoint"):
        trainer.load(path)
    state = trainer.state_dict()
    state["format"] = "jodi_core.train/99"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="format 'jodi_core.train/99'") as err:
        trainer.load(path)
    _no_unsafe_advice(err.value)
