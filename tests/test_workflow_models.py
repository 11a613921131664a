"""The shipped workflows' model download links (``properties.models`` on the loader nodes), read without a host.

The current front end (1.49) shows a missing-models dialog when a loader's combo value ends in a model extension and
is not installed; it offers a download when the loader's ``properties.models`` holds an entry of that name with a
``url`` on huggingface.co and a ``directory`` (the models/ folder it saves into). workflows/build_workflows.py fills
the entries from one table, MODEL_DOWNLOADS; the README's Models table links the same URLs.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from pack_modules import pack_module

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "workflows").glob("*.json"))
DEMO = pack_module("nodes.vocabulary").DEMO_MODEL_CHOICE

# Loader node -> (the input naming its model, the model folders that loader reads)
LOADERS = {
    "JodiModelLoader": ("ckpt_name", {"diffusion_models", "jodi"}),
    "JodiVAELoader": ("vae_name", {"vae"}),
    "CLIPLoader": ("clip_name", {"text_encoders"}),
    "JanusLoader": ("model_name", {"Janus-Pro"}),
    "CheckpointLoaderSimple": ("ckpt_name", {"checkpoints"}),
    "ControlNetLoader": ("control_net_name", {"controlnet"}),
}
# What the front end's missing-model download accepts as a file name (missingModelMetadata, 1.49)
DOWNLOADABLE = (".safetensors", ".sft", ".ckpt", ".pth", ".pt")
HF_FILE = re.compile(r"^https://huggingface\.co/([\w.-]+/[\w.-]+)/resolve/main/([\w./-]+)$")


def _build_script():
    spec = importlib.util.spec_from_file_location("build_workflows", REPO / "workflows" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # stdlib imports only; ComfyUI is needed by main(), not by the tables
    return module


def _loader_nodes():
    for path in WORKFLOWS:
        for node in json.loads(path.read_text())["nodes"]:
            if node["type"] in LOADERS:
                yield path.stem, node


def _value(node: dict) -> str:
    """The loader's selected model: its first string widget value (the model combo comes first on every loader)."""
    return next(v for v in node["widgets_values"] if isinstance(v, str))


def test_every_loader_names_its_download():
    nodes = list(_loader_nodes())
    assert {n["type"] for _, n in nodes} == set(LOADERS), "a loader kind is no longer used: update LOADERS"
    for workflow, node in nodes:
        where = f"{workflow}: {node['type']} #{node['id']}"
        value = _value(node)
        models = node["properties"].get("models")
        if value == DEMO:
            assert models is None, f"{where}: the built-in demo model needs no download"
            continue
        assert isinstance(models, list) and len(models) == 1, f"{where}: properties.models = {models!r}"
        entry = models[0]
        assert set(entry) == {"name", "url", "directory"}, f"{where}: {entry}"
        assert entry["directory"] in LOADERS[node["type"]][1], f"{where}: directory {entry['directory']!r}"
        m = HF_FILE.match(entry["url"])
        assert m, f"{where}: {entry['url']} is not a Hugging Face resolve/main file URL"
        if node["type"] == "JanusLoader":
            # A folder model: the entry names its weights as ComfyUI lists them, <folder>/<file>.
            assert entry["name"] == f"{value}/{m[2]}" and m[2] in ("pytorch_model.bin", "model.safetensors"), where
        else:
            assert entry["name"] == value, f"{where}: entry {entry['name']!r} but the loader selects {value!r}"
            assert value.endswith(DOWNLOADABLE), f"{where}: the dialog offers no download for {value!r}"


def test_links_come_from_the_one_table():
    table = _build_script().MODEL_DOWNLOADS
    used = set()
    for workflow, node in _loader_nodes():
        value = _value(node)
        if value == DEMO:
            continue
        d = table[value]
        assert node["properties"]["models"] == [{"name": d.name or value, "url": d.url, "directory": d.directory}], \
            f"{workflow}: rebuild the workflows (python workflows/build_workflows.py --comfyui ...)"
        used.add(value)
    assert used == set(table), f"MODEL_DOWNLOADS entries no workflow uses: {sorted(set(table) - used)}"


def test_readme_models_table_links_the_same_files():
    """The README's Models section links each download URL and names the file it is saved as."""
    readme = (REPO / "README.md").read_text()
    start = readme.find("## Models")
    assert start >= 0, "README has no '## Models' section"
    end = readme.find("\n## ", start + 1)
    section = readme[start:end if end > 0 else None]
    missing = []
    for value, d in _build_script().MODEL_DOWNLOADS.items():
        if d.url not in section:
            missing.append(f"{value}: {d.url}")
        if value not in section:
            missing.append(f"{value}: the file name")
    assert not missing, "README Models table lacks:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def draft_workflow():
    ui = json.loads((REPO / "workflows" / "janus_draft_to_jodi_1024.json").read_text())
    api = json.loads((REPO / "workflows" / "api" / "janus_draft_to_jodi_1024.json").read_text())
    return ui, api


def test_janus_draft_workflow_shares_one_prompt_and_renders_1024(draft_workflow):
    _, api = draft_workflow
    by_type = {}
    for nid, node in api.items():
        by_type.setdefault(node["class_type"], []).append(nid)
    janus, encode = api[by_type["JanusGenerate"][0]], api[by_type["JodiTextEncode"][0]]
    # One prompt node feeds Janus and Jodi Text Encode.
    assert janus["inputs"]["prompt"] == encode["inputs"]["text"]
    assert api[janus["inputs"]["prompt"][0]]["class_type"] == "PrimitiveStringMultiline"
    # Jodi perceives the Janus draft, and generates from its depth and lineart with the encoded prompt.
    per = api[by_type["JodiPerception"][0]]
    assert per["inputs"]["image"] == [by_type["JanusGenerate"][0], 0]
    gen = api[by_type["JodiControllableGeneration"][0]]
    pid = by_type["JodiPerception"][0]
    assert gen["inputs"]["depth"] == [pid, 2] and gen["inputs"]["lineart"] == [pid, 0]
    assert gen["inputs"]["positive"] == [by_type["JodiTextEncode"][0], 0]
    assert (gen["inputs"]["aspect"], gen["inputs"]["width"], gen["inputs"]["height"]) == ("width x height", 1024,
                                                                                             1024)
