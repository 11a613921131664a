"""Broken graphs: ComfyUI reports a node error naming the problem, and the server keeps serving afterwards."""

import json

import pytest

pytestmark = pytest.mark.host


def _require_model_code():
    """Runs that load Jodi models need the jodi_core model code (written in parallel by other pieces)."""
    for module in ("jodi_core.loading", "jodi_core.dit.model", "jodi_core.dcae.model"):
        pytest.importorskip(module, reason=f"{module} not present yet")


DOMAINS = ("image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose")
AUTO_ROLES = {f"{d}_role": "auto" for d in DOMAINS}


def _assert_still_serving(comfy, host_models, name):
    """A good prompt right after the failure runs normally."""
    assert comfy.alive()
    graph = {
        "1": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": host_models.gemma_file, "type": "lumina2", "device": "default"}},
        "2": {"class_type": "JodiTextEncode",
              "inputs": {"clip": ["1", 0], "text": f"still serving after {name}", "complex_human_instruction": True}},
        "3": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": f"after_{name}"}},
    }
    entry = comfy.run_prompt(graph)
    assert entry["status"]["status_str"] == "success"


def _validation_errors(comfy, graph) -> dict:
    status, body = comfy.queue_prompt(graph)
    assert status == 400, f"expected a validation error, got {status}: {json.dumps(body)[:500]}"
    assert body["error"]["type"] == "prompt_outputs_failed_validation", body
    return body["node_errors"]


def _messages(node_error: dict) -> str:
    return " ".join(f"{e.get('message', '')} {e.get('details', '')}" for e in node_error["errors"])


def test_missing_model_file(comfy, host_models):
    graph = {
        "1": {"class_type": "JodiModelLoader",
              "inputs": {"ckpt_name": "no-such-jodi.safetensors", "dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["1", 0], "name": "missing_model"}},
    }
    errors = _validation_errors(comfy, graph)
    assert set(errors) == {"1"}
    assert "no-such-jodi.safetensors" in _messages(errors["1"])
    _assert_still_serving(comfy, host_models, "missing_model")


def test_missing_text_encoder_file(comfy, host_models):
    graph = {
        "1": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": "no-such-gemma.safetensors", "type": "lumina2", "device": "default"}},
        "2": {"class_type": "JodiTextEncode",
              "inputs": {"clip": ["1", 0], "text": "x", "complex_human_instruction": True}},
        "3": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": "missing_te"}},
    }
    errors = _validation_errors(comfy, graph)
    assert "1" in errors and "clip_name" in json.dumps(errors["1"])
    _assert_still_serving(comfy, host_models, "missing_te")


def test_condition_role_without_image(comfy, host_models):
    inputs = dict(AUTO_ROLES)
    inputs["depth_role"] = "condition"  # but no depth image connected
    graph = {
        "1": {"class_type": "JodiRoles", "inputs": inputs},
        "2": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["1", 0], "name": "roles"}},
    }
    errors = _validation_errors(comfy, graph)
    assert set(errors) == {"1"}
    text = _messages(errors["1"])
    assert "depth" in text and "condition" in text
    _assert_still_serving(comfy, host_models, "missing_condition")


def test_wrong_size(comfy, host_models):
    info = comfy.object_info("JodiSampler")
    assert info, "JodiSampler is not registered"
    graph = {
        "1": {"class_type": "JodiModelLoader",
              "inputs": {"ckpt_name": host_models.jodi_file, "dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "JodiVAELoader", "inputs": {"vae_name": host_models.vae_file, "dtype": "auto"}},
        "3": {"class_type": "JodiRoles", "inputs": dict(AUTO_ROLES)},
        "4": {"class_type": "JodiSampler", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "roles": ["3", 0], "aspect": "width x height", "width": 20,
            "height": 64, "steps": 1, "cfg": 1.0, "seed": 0, "sampler": "euler-flow", "flow_shift": 3.0,
            "batch_size": 1}},
        "5": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["4", 0], "name": "wrong_size"}},
    }
    # Fill any sampler widget this test does not know about with its declared default.
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if name not in graph["4"]["inputs"] and len(spec) > 1 and "default" in spec[1]:
                graph["4"]["inputs"][name] = spec[1]["default"]
    errors = _validation_errors(comfy, graph)
    assert set(errors) == {"4"} and "width" in json.dumps(errors["4"])
    _assert_still_serving(comfy, host_models, "wrong_size")


def test_corrupt_model_file_is_an_execution_error_naming_the_file(comfy, host_models):
    pytest.importorskip("jodi_core.loading", reason="jodi_core.loading not present yet")
    bad = host_models.root / "diffusion_models" / "truncated-jodi.safetensors"
    data = (host_models.root / "diffusion_models" / host_models.jodi_file).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    graph = {
        "1": {"class_type": "JodiModelLoader",
              "inputs": {"ckpt_name": bad.name, "dtype": "auto", "attention": "auto"}},
        "2": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["1", 0], "name": "corrupt"}},
    }
    entry = comfy.run_prompt(graph, expect_success=False)
    assert entry["status"]["status_str"] == "error"
    err = next(data for kind, data in entry["status"]["messages"] if kind == "execution_error")
    assert err["node_id"] == "1"
    assert bad.name in err["exception_message"], err["exception_message"]
    _assert_still_serving(comfy, host_models, "corrupt_model")
