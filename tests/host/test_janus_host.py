"""The Janus nodes in the real host (the server of conftest.py) with the tiny random Janus folder the
fixture writes into models/Janus-Pro (weights, config.json, tokenizer.json built by tests/janus_tiny.py).

Expected values come from the engine run here on the same folder (CPU, float32: what Janus Loader's 'auto' gives
with --cpu), so the host path (folder listing, loader, ModelPatcher, IMAGE layout, list outputs) must reproduce
them exactly. The shipped Janus workflows run as shipped, on the tiny stand-ins linked under their model names.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import load_file

from .comfy_server import assert_progress_reaches
from .test_runtime_host import _collect
from .test_workflows_host import REPO_ROOT, _manifest, _prepare, _saved_images, _strip_meta

pytestmark = pytest.mark.host

JANUS_WORKFLOWS = sorted(name for name in _manifest() if name.startswith("janus_"))


@pytest.fixture(scope="module")
def reference(host_models):
    from jodi_core.janus import load_janus

    return load_janus(host_models.root / "Janus-Pro" / host_models.janus_dir, dtype=torch.float32)


def _loader(host_models) -> dict:
    return {"class_type": "JanusLoader", "inputs": {"model_name": host_models.janus_dir, "dtype": "auto"}}


def _empty_image(width: int, height: int, batch: int, color: int) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": width, "height": height, "batch_size": batch,
                                                   "color": color}}


def _color_image(width: int, height: int, batch: int, color: int) -> torch.Tensor:
    """What core EmptyImage makes: (B, 3, H, W) filled with the 0xRRGGBB colour."""
    rgb = torch.tensor([(color >> 16) & 255, (color >> 8) & 255, color & 255], dtype=torch.float32) / 255
    return rgb.reshape(1, 3, 1, 1).expand(batch, 3, height, width)


def _ui_text(history: dict, node: str) -> list:
    return history["outputs"][node]["text"]


def test_janus_nodes_are_served(comfy, host_models):
    info = comfy.object_info()
    for node in ("JanusLoader", "JanusCaption", "JanusAsk", "JanusGenerate"):
        assert info[node]["category"].startswith("Janus/"), node
    names = info["JanusLoader"]["input"]["required"]["model_name"]
    options = names[0] if isinstance(names[0], list) else names[1]["options"]
    assert host_models.janus_dir in options and "Janus-Pro-1B" in options  # the real folder and the workflow link
    assert info["JanusCaption"]["output_is_list"] == [True]
    assert info["JanusCaption"]["output"] == ["STRING"]


def test_caption_batch_returns_one_string_per_image(comfy, host_models, reference):
    from jodi_core.janus import janus_understand

    prompt = {
        "1": _loader(host_models),
        "2": _empty_image(24, 16, 2, 0x3366CC),
        "3": {"class_type": "JanusCaption", "inputs": {"model": ["1", 0], "image": ["2", 0], "detail": "detailed",
                                                       "max_new_tokens": 20}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    history = comfy.run_prompt(prompt)
    captions = _ui_text(history, "3")
    assert isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)
    question = "Describe this image in detail."
    expected = janus_understand(reference, _color_image(24, 16, 2, 0x3366CC), question, max_new_tokens=20)
    assert captions == [e.strip() for e in expected]
    # Preview as Text received the STRING list item by item.
    assert _ui_text(history, "4") == captions


def test_model_is_freed_and_reloaded(comfy, host_models):
    """'Free model and node cache' (POST /free) drops the Janus patcher; the next run loads it again."""
    prompt = {
        "1": _loader(host_models),
        "2": _empty_image(16, 16, 1, 0xCC3333),
        "3": {"class_type": "JanusCaption", "inputs": {"model": ["1", 0], "image": ["2", 0], "detail": "brief",
                                                       "max_new_tokens": 8}},
        "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}},
    }
    first = _ui_text(comfy.run_prompt(prompt), "3")
    _, again = comfy.free_and_rerun(lambda attempt: prompt, {"1"})
    assert _ui_text(again, "3") == first


def test_ask_samples_with_the_seed(comfy, host_models, reference):
    from jodi_core.janus import janus_understand

    settings = {"images_together": False, "do_sample": True, "temperature": 1.3, "top_p": 0.9,
                "max_new_tokens": 16, "repetition_penalty": 1.1, "seed": 77}
    prompt = {
        "1": _loader(host_models),
        "2": {"class_type": "JanusAsk", "inputs": {"model": ["1", 0], "question": "How many people are there?",
                                                   **settings}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }
    answers = _ui_text(comfy.run_prompt(prompt), "2")
    expected = janus_understand(reference, None, "How many people are there?", do_sample=True, temperature=1.3,
                                top_p=0.9, max_new_tokens=16, repetition_penalty=1.1, seed=77)
    assert answers == [expected[0].strip()]


def test_generate_images_and_progress(comfy, host_models, reference):
    from jodi_core.janus import janus_generate

    prompt = {
        "1": _loader(host_models),
        "2": {"class_type": "JanusGenerate", "inputs": {"model": ["1", 0], "prompt": "a red fox in the snow",
                                                        "cfg": 4.0, "temperature": 1.0, "seed": 5,
                                                        "batch_size": 3}},
        "3": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": "janus_generate"}},
    }
    messages = asyncio.run(_collect(comfy, prompt))
    assert any(m["type"] == "execution_success" for m in messages), [m["type"] for m in messages]
    n = reference.config.gen_image_tokens
    assert_progress_reaches([m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "2"],
                            n)
    image = load_file(comfy.output_dir / "jodi_probe" / "janus_generate.safetensors")["value"]
    size = reference.config.gen_image_size
    assert image.shape == (3, size, size, 3)
    expected = janus_generate(reference, "a red fox in the snow", cfg_weight=4.0, temperature=1.0, parallel_size=3,
                              seed=5)
    assert torch.equal(image, expected.permute(0, 2, 3, 1))


def test_bad_inputs_are_reported_by_name(comfy, host_models):
    status, body = comfy.queue_prompt({
        "1": {"class_type": "JanusLoader", "inputs": {"model_name": "Janus-Pro-404", "dtype": "auto"}},
        "2": {"class_type": "JanusGenerate", "inputs": {"model": ["1", 0], "prompt": "a cat", "cfg": 5.0,
                                                        "temperature": 1.0, "seed": 0, "batch_size": 99}},
        "3": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": "bad"}},
    })
    assert status == 400
    text = json.dumps(body)
    assert "model_name must be one of" in text and "batch_size must be between 1 and 16" in text


@pytest.mark.parametrize("name", JANUS_WORKFLOWS)
def test_shipped_janus_workflow(comfy, host_models, reference, probe_dir, name):
    entry = _manifest()[name]
    prompt = _prepare(comfy, host_models, name)
    captions = [nid for nid, n in prompt.items() if n["class_type"] == "JanusCaption"]
    encoders = [nid for nid, n in prompt.items() if n["class_type"] == "JodiTextEncode"]
    for nid in encoders:  # also keep what the caption became
        prompt[f"probe{nid}"] = {"class_type": "JodiTestSaveTensors",
                                 "inputs": {"value": [nid, 0], "name": f"{name}_{nid}"}}
    history = comfy.run_prompt(prompt, timeout=600)

    saved = _saved_images(comfy, prompt, history)
    assert set(saved) == set(entry["saves"].values())
    for key, prefix in entry["saves"].items():
        assert len(saved[prefix]) == 1, prefix
        image = saved[prefix][0]
        size_hw = entry["size_hw"][key] if isinstance(entry["size_hw"], dict) else entry["size_hw"]
        if isinstance(size_hw, list):
            assert image.size == (size_hw[1], size_hw[0]), (prefix, image.size)
        else:  # Janus's own size: the tiny model's
            size = reference.config.gen_image_size
            assert image.size == (size, size), (prefix, image.size)

    for nid in captions:  # the caption is a string
        text = _ui_text(history, nid)
        assert len(text) == 1 and isinstance(text[0], str) and "\n" not in text[0]
    for enc in encoders:  # what Jodi Text Encode encoded is the caption, or the prompt text it shares with Janus
        source = prompt[enc]["inputs"]["text"]
        assert isinstance(source, list), "the shipped Janus workflows link Jodi Text Encode's text"
        if prompt[source[0]]["class_type"] == "JanusCaption":
            text = _ui_text(history, source[0])[0]
        else:
            text = prompt[source[0]]["inputs"]["value"]
        clip = prompt[enc]["inputs"]["clip"]
        check = {
            "c": dict(prompt[clip[0]]),
            "e": {"class_type": "JodiTextEncode", "inputs": {**prompt[enc]["inputs"], "clip": ["c", clip[1]],
                                                             "text": text}},
            "p": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["e", 0], "name": f"{name}_direct"}},
        }
        comfy.run_prompt(check)
        linked = load_file(probe_dir / f"{name}_{enc}.safetensors")
        direct = load_file(probe_dir / f"{name}_direct.safetensors")
        assert torch.equal(linked["value.0.0"], direct["value.0.0"])


def test_caption_feeds_the_text_widget_as_a_socket():
    """In the UI file Jodi Text Encode's text widget is a socket fed by Janus Caption, as the front end saves a
    converted widget (its widgets_values slot kept); the API twin links it the same way."""
    entry = _manifest()["janus_caption_to_jodi"]
    ui = json.loads((REPO_ROOT / entry["ui"]).read_text())
    api = _strip_meta(json.loads((REPO_ROOT / entry["api"]).read_text()))
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {link[0]: link for link in ui["links"]}
    encode = next(n for n in ui["nodes"] if n["type"] == "JodiTextEncode")
    text = next(i for i in encode["inputs"] if i["name"] == "text")
    assert text["widget"] == {"name": "text"} and text["type"] == "STRING"
    source = links[text["link"]]
    assert nodes[source[1]]["type"] == "JanusCaption" and source[3] == encode["id"]
    assert source[4] == encode["inputs"].index(text)
    assert len(encode["widgets_values"]) == 2  # text (kept) and complex_human_instruction
    assert api[str(encode["id"])]["inputs"]["text"] == [str(source[1]), 0]
