"""CUDA-only checks of the Janus engine: CUDA-graph decode steps give the same tokens as eager steps."""

from __future__ import annotations

import pytest
import torch

from janus_tiny import write_tiny_janus
from jodi_core.janus import janus_generate_codes, janus_understand_tokens, load_janus
from jodi_core.janus.decode import DecodeStepper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = write_tiny_janus(tmp_path_factory.mktemp("janus") / "Janus-Tiny", seed=2)
    return load_janus(folder, dtype=torch.float32, device="cuda")


def test_graph_capture_succeeds(model):
    cache = model.new_cache(2, 8)
    assert DecodeStepper(model.language_model.model, cache, 2, mode="auto").graph is not None


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_graph_and_eager_generation_agree(model, temperature):
    runs = []
    for mode in ("graph", "eager"):
        model.decode_mode = mode
        runs.append(janus_generate_codes(model, "A cat", cfg_weight=2.0, temperature=temperature, parallel_size=2, seed=3))
    model.decode_mode = "auto"
    assert torch.equal(runs[0], runs[1])


def test_graph_and_eager_understanding_agree(model):
    images = [[torch.rand(3, 16, 16)], []]
    runs = []
    for mode in ("graph", "eager"):
        model.decode_mode = mode
        runs.append(janus_understand_tokens(model, images, ["Hi", "Describe the picture"], max_new_tokens=8))
    model.decode_mode = "auto"
    assert runs[0] == runs[1]
