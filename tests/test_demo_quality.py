"""The shipped demo model's measured quality on held-out synthetic scenes: behaviour checks, not exact values.

The bounds (``THRESHOLDS`` in benchmarks/demo_quality.py) are the demo model's measurements on the first 12
held-out scenes minus a margin; tiny random weights must miss them, so these checks can fail.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from jodi_core.jobs.demo import demo_model_paths, load_demo_models, tiny_random_models
from jodi_core.pipeline import JodiPipeline

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "demo_quality.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("demo_quality", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["demo_quality"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


dq = _load_benchmark()


@pytest.fixture(scope="module")
def one_thread():
    # One thread is steadier than two on a shared machine (no spinning threads waiting on each other).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _evaluate(dit, vae) -> dict:
    return dq.evaluate(JodiPipeline(dit, vae), dq.TEST_SCENES, steps=dq.TEST_STEPS, batch=dq.TEST_SCENES,
                       depth_only=False)


def test_held_out_scenes_are_not_training_scenes():
    assert dq.HELD_OUT_SEED not in dq.TRAINING_SEEDS
    held_out = dq.held_out_scenes(0, 2)
    for seed in dq.TRAINING_SEEDS:
        train = dq.held_out_scenes(0, 2, seed=seed)
        assert not any((a.domains["image"] == b.domains["image"]).all() for a in held_out for b in train)


def test_failed_checks_reports_each_miss():
    thresholds = (("a", "<", 1.0), ("b", ">", 0.5))
    assert dq.failed_checks({"a": 0.5, "b": 0.7}, thresholds) == []
    assert dq.failed_checks({"a": 1.5, "b": 0.7}, thresholds) == ["a = 1.5000, needs < 1.0"]
    assert len(dq.failed_checks({"a": 1.0, "b": 0.5}, thresholds)) == 2  # bounds are strict


@pytest.mark.slow  # ~35 s of CPU time on one thread
def test_demo_model_passes_and_random_weights_fail(one_thread):
    try:
        demo_model_paths()
    except FileNotFoundError:
        pytest.skip("no trained demo model in this checkout")
    dit, vae, trained = load_demo_models()
    assert trained
    demo = _evaluate(dit, vae)
    assert dq.failed_checks(demo) == [], demo

    random = _evaluate(*tiny_random_models())
    missed = {line.split(" = ")[0] for line in dq.failed_checks(random)}
    assert missed == {key for key, _, _ in dq.THRESHOLDS}, random  # random weights miss every check

    # Maps that ignore the image (the same mean maps for every scene) miss every perception check too.
    mean_maps = dq.mean_map_baseline(dq.TEST_SCENES)
    perception = tuple(check for check in dq.THRESHOLDS if check[0] in mean_maps)
    missed = {line.split(" = ")[0] for line in dq.failed_checks(mean_maps, perception)}
    assert missed == {key for key, _, _ in perception}, mean_maps
    assert demo["edge_f"] > mean_maps["edge_f_mark_all"]  # better than marking every pixel an edge
