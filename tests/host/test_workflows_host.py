"""Every shipped workflow, as ComfyUI sees it: the UI file converts to its API twin, and the twin runs on the host.

workflows/api/manifest.json (written by workflows/build_workflows.py) lists per workflow its UI and API files, the
input images it loads (under the shared test data), the images it saves and their expected size. The workflows
name the built-in demo model; where that is not available the tests point the loaders at the tiny test models.
Steps are cut to 2 (1 for SD 1.5) to keep the suite fast; sizes and counts are checked as shipped.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import DATA_DIR as SHARED_DATA  # the repo's test data, or JODI_SHARED

from .ui_to_api import convert

pytestmark = pytest.mark.host


def _require_model_code():
    """Runs that load Jodi models need the jodi_core model code (written in parallel by other pieces)."""
    for module in ("jodi_core.loading", "jodi_core.dit.model", "jodi_core.dcae.model"):
        pytest.importorskip(module, reason=f"{module} not present yet")

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO_ROOT / "workflows"
MANIFEST = WORKFLOWS / "api" / "manifest.json"
FAST_STEPS = 2
SD_SIZE_HW = [192, 256]  # the SD 1.5 generation of the ControlNet chain runs smaller (its VAE is full size)


def _manifest() -> dict:
    return json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}


WORKFLOW_NAMES = sorted(_manifest())


def _strip_meta(prompt: dict) -> dict:
    return {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in prompt.items()}


def test_every_ui_workflow_has_an_api_twin():
    ui_files = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
    assert ui_files, "no workflows shipped"
    assert ui_files == WORKFLOW_NAMES, "workflows/*.json and workflows/api/manifest.json disagree"
    for name in ui_files:
        assert (WORKFLOWS / "api" / f"{name}.json").is_file(), name


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_ui_workflow_converts_to_its_api_twin(comfy, name):
    entry = _manifest()[name]
    ui = json.loads((REPO_ROOT / entry["ui"]).read_text())
    api = json.loads((REPO_ROOT / entry["api"]).read_text())
    assert convert(ui, comfy.object_info()) == _strip_meta(api)


def test_workflows_are_served_as_templates(comfy):
    templates = comfy.get_json("/api/workflow_templates")
    assert sorted(templates.get("ComfyUI-Jodi", [])) == WORKFLOW_NAMES


def _demo_available() -> bool:
    try:
        from jodi_core.jobs.demo import demo_model_paths

        demo_model_paths()
        return True
    except (ImportError, FileNotFoundError):
        return False


def _prepare(comfy, host_models, name: str) -> dict:
    entry = _manifest()[name]
    prompt = _strip_meta(json.loads((REPO_ROOT / entry["api"]).read_text()))
    for target, source in entry.get("inputs", {}).items():
        src = SHARED_DATA / source
        if not src.is_file():
            pytest.fail(f"input image {src} for {name} not found; set JODI_SHARED")
        shutil.copyfile(src, comfy.input_dir / target)
    use_tiny = not _demo_available()
    for node in prompt.values():
        inputs = node["inputs"]
        if use_tiny and node["class_type"] == "JodiModelLoader":
            inputs["ckpt_name"] = host_models.jodi_file
        if use_tiny and node["class_type"] == "JodiVAELoader":
            inputs["vae_name"] = host_models.vae_file
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            # 2 steps keep the second-order DPM-Solver++ update in play; the SD 1.5 KSampler only needs to run.
            inputs["steps"] = min(inputs["steps"], 1 if node["class_type"] == "KSampler" else FAST_STEPS)
        if node["class_type"] == "EmptyLatentImage":  # the SD 1.5 half of the ControlNet chain: smaller is enough
            inputs["width"], inputs["height"] = SD_SIZE_HW[1], SD_SIZE_HW[0]
    return prompt


def _saved_images(comfy, prompt: dict, history: dict) -> dict[str, list]:
    """filename_prefix -> list of PIL images saved by that SaveImage node."""
    from PIL import Image

    out = {}
    for nid, node in prompt.items():
        if node["class_type"] != "SaveImage":
            continue
        images = history["outputs"].get(nid, {}).get("images", [])
        out[node["inputs"]["filename_prefix"]] = [Image.open(io.BytesIO(comfy.view(img))) for img in images]
    return out


@pytest.mark.parametrize("name", WORKFLOW_NAMES)
def test_workflow_runs_and_saves_the_right_images(comfy, host_models, request, name):
    _require_model_code()
    entry = _manifest()[name]
    models = entry.get("models", {})
    if "checkpoints" in models or "controlnet" in models:  # the ControlNet chain: an SD 1.5 model downstream
        request.getfixturevalue("sd15_models")(models.get("checkpoints", []), models.get("controlnet", []))
    prompt = _prepare(comfy, host_models, name)
    history = comfy.run_prompt(prompt, timeout=600)
    saved = _saved_images(comfy, prompt, history)
    assert set(saved) == set(entry["saves"].values())
    sizes = set()
    for key, prefix in entry["saves"].items():
        images = saved[prefix]
        assert len(images) == 1, f"{prefix}: {len(images)} images"
        size_hw = entry["size_hw"]
        if isinstance(size_hw, dict):
            # In the ControlNet chain "image" is the SD 1.5 result, whose size the test shrank.
            size_hw = SD_SIZE_HW if key == "image" and "checkpoints" in entry.get("models", {}) else size_hw[key]
        if isinstance(size_hw, list):
            assert images[0].size == (size_hw[1], size_hw[0]), f"{prefix}: {images[0].size} (w, h)"
        sizes.add(images[0].size)
    if isinstance(entry["size_hw"], str):  # bucket of the model: square for 1:1, the same for every map
        assert len(sizes) == 1 and next(iter(sizes))[0] == next(iter(sizes))[1], sizes
