"""Shared test configuration: where the golden fixtures and the real example data live."""

import json
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# The repo keeps its own copy of the test data (tests/data), so a clone made anywhere passes its tests.
# JODI_SHARED points at another tree of the same layout (data/..., fixtures/jodi); JODI_FIXTURES at fixtures alone.
SHARED_DIR = Path(os.environ.get("JODI_SHARED", REPO_ROOT / "tests" / "data"))
DATA_DIR = SHARED_DIR / "data" if "JODI_SHARED" in os.environ else SHARED_DIR
FIXTURES_DIR = Path(os.environ.get("JODI_FIXTURES", SHARED_DIR / "fixtures" / "jodi"))
TEST_IMAGES_DIR = DATA_DIR / "jodi_test_images"
EXAMPLE_DATA_DIR = DATA_DIR / "jodi_example_data"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not FIXTURES_DIR.is_dir():
        pytest.fail(f"Golden fixtures not found at {FIXTURES_DIR}; set JODI_FIXTURES.")
    return FIXTURES_DIR


def fixture_config_overrides(fixtures_dir: Path) -> dict:
    """The JodiConfig fields tensor shapes cannot tell, from the reference config the DiT fixture was made with
    (``dit_tiny_weights.json``), so a fixture set of another size or head count is read as it was made."""
    ref = json.loads((fixtures_dir / "dit_tiny_weights.json").read_text())["config"]
    return dict(num_heads=ref["num_heads"], linear_head_dim=ref["linear_head_dim"],
                base_size=ref["input_size"] // ref["patch_size"], pe_interpolation=ref["pe_interpolation"],
                use_pe=ref["use_pe"], y_norm_scale_factor=ref["y_norm_scale_factor"])


@pytest.fixture(scope="session")
def test_images_dir() -> Path:
    return TEST_IMAGES_DIR


@pytest.fixture(scope="session")
def example_data_dir() -> Path:
    return EXAMPLE_DATA_DIR


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: the fixtures were made with one, and more threads change float32 sums by ~1e-5."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
