"""The pack inside a real ComfyUI host: it imports quickly, registers its nodes, and /object_info describes them."""

import json
import os
import re
from pathlib import Path

import pytest

from .comfy_server import PACK_FOLDER_NAME, REPO_ROOT, host_version

pytestmark = pytest.mark.host

PACK_MODULE = f"custom_nodes.{PACK_FOLDER_NAME}"
IMPORT_BUDGET_S = 1.0  # the pack must not slow ComfyUI's start-up noticeably


@pytest.fixture(scope="module")
def pack_nodes(comfy) -> dict:
    info = comfy.object_info()
    return {name: entry for name, entry in info.items() if entry.get("python_module") == PACK_MODULE}


def test_server_is_the_host_asked_for_on_cpu(comfy):
    stats = comfy.get_json("/system_stats")
    assert stats["system"]["comfyui_version"] == host_version(comfy.comfy_dir)
    assert [d["type"] for d in stats["devices"]] == ["cpu"]


def test_pack_imports_without_error_and_fast(comfy):
    log = comfy.log_text()
    assert "Import times for custom nodes" in log
    assert "(IMPORT FAILED): " not in "\n".join(l for l in log.splitlines() if PACK_FOLDER_NAME in l), \
        comfy.log_tail()
    assert "Cannot import" not in log or PACK_FOLDER_NAME not in log.split("Cannot import", 1)[1].splitlines()[0]
    seconds = comfy.import_seconds()
    assert seconds is not None, "no import-time line for the pack:\n" + comfy.log_tail()
    assert seconds < IMPORT_BUDGET_S, f"pack import took {seconds:.1f} s (budget {IMPORT_BUDGET_S} s)"


def _from_the_pack(record: dict) -> bool:
    """A record logged by the pack's modules, a warning raised in its files, or a host message that names it."""
    pack_root = Path(os.environ.get("JODI_HOST_PACK", REPO_ROOT)).resolve()
    path = Path(record["pathname"]).resolve() if record["pathname"] else None
    # The pack's code only: the default ComfyUI cache and the test probe pack live under the checkout too.
    in_pack = path is not None and path.is_relative_to(pack_root) \
        and path.relative_to(pack_root).parts[0] in ("__init__.py", "nodes", "jodi_core")
    return in_pack or PACK_FOLDER_NAME in record["logger"] or PACK_FOLDER_NAME in record["message"]


def test_import_time_log_has_no_warning_or_error_from_the_pack(comfy):
    records = comfy.log_records()
    ends = [i for i, r in enumerate(records) if "Import times for custom nodes" in r["message"]]
    assert ends, "no 'Import times for custom nodes' record:\n" + comfy.log_tail()
    end = ends[0] + 1
    while end < len(records) and re.match(r"\s*[0-9.]+ seconds", records[end]["message"]):
        end += 1  # the per-folder import-time lines
    import_time = records[:end]
    trouble = [r for r in import_time if r["level"] in ("WARNING", "ERROR", "CRITICAL") and _from_the_pack(r)]
    assert not trouble, "\n".join(f"{r['level']} {r['logger']} ({r['pathname']}): {r['message']}" for r in trouble)
    # The check sees the records the pack's import produced: its own import-time line passes the same way.
    assert any(PACK_FOLDER_NAME in r["message"] for r in import_time), import_time[-5:]


def test_object_info_answers_for_a_pack_node(comfy):
    entry = comfy.object_info("JodiTextEncode")
    assert entry, "JodiTextEncode is not registered:\n" + comfy.log_tail()
    assert entry["python_module"] == PACK_MODULE
    assert comfy.object_info("JodiNoSuchNode") == {}


def test_every_pack_node_is_documented(pack_nodes):
    assert pack_nodes, "the pack registered no nodes"
    problems = []
    for name, entry in sorted(pack_nodes.items()):
        if not (name.startswith("Jodi") or name.startswith("Janus")):
            problems.append(f"{name}: node id without a Jodi/Janus prefix")
        menu, _, submenu = entry["category"].partition("/")
        if menu not in ("Jodi", "Janus") or not submenu:
            problems.append(f"{name}: category {entry['category']!r} not in a Jodi/ or Janus/ submenu")
        if not entry.get("description"):
            problems.append(f"{name}: no description")
        for section in ("required", "optional"):
            for input_name, spec in entry["input"].get(section, {}).items():
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if not opts.get("tooltip"):
                    problems.append(f"{name}.{input_name}: no tooltip")
        if len(entry["output"]) != len(entry["output_name"]):
            problems.append(f"{name}: outputs and output names differ in length")
    assert not problems, "\n".join(problems)


def test_text_encode_schema(comfy):
    entry = comfy.object_info("JodiTextEncode")
    required = entry["input"]["required"]
    assert entry["input_order"]["required"] == ["clip", "text", "complex_human_instruction"]
    assert required["clip"][0] == "CLIP"
    assert required["text"][0] == "STRING" and required["text"][1]["multiline"] is True
    assert required["complex_human_instruction"][0] == "BOOLEAN"
    assert required["complex_human_instruction"][1]["default"] is True
    assert entry["output"] == ["CONDITIONING"]
    # Users must be told plainly which Gemma to use.
    for text in (required["clip"][1]["tooltip"], entry["description"]):
        assert "Gemma-2-2B-IT" in text and "NOT the base Gemma-2-2B" in text


DOMAINS = ["image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose"]


def _inputs(entry: dict) -> dict:
    return {**entry["input"].get("required", {}), **entry["input"].get("optional", {})}


def _options(spec) -> list:
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def test_node_contract_from_the_design(comfy):
    """The sockets the design fixes (custom types, standard types where users chain, options offered)."""
    info = comfy.object_info()
    missing = [n for n in ("JodiModelLoader", "JodiVAELoader", "JodiRoles", "JodiSampler", "JodiDecode",
                           "JodiTextEncode", "JodiJointGeneration", "JodiControllableGeneration", "JodiPerception",
                           "JodiDepthToControlNet", "JodiNormalConvention", "JodiSegToADE20K", "JodiLatentSplit",
                           "JodiLatentMerge") if n not in info]
    assert not missing, f"nodes not registered: {missing}"

    model, vae = info["JodiModelLoader"], info["JodiVAELoader"]
    assert model["output"] == ["JODI_MODEL"] and vae["output"] == ["JODI_VAE"]
    for entry in (model, vae):
        assert {"auto", "bf16", "fp16", "fp32"} <= set(_options(_inputs(entry)["dtype"]))
    for entry in (model, vae):
        assert {"auto", "triton", "torch"} <= set(_options(_inputs(entry)["attention"]))

    roles = info["JodiRoles"]
    assert roles["output"] == ["JODI_ROLES"]
    assert all(roles["input"]["optional"][d][0] == "IMAGE" for d in DOMAINS)

    sampler = info["JodiSampler"]
    ins = _inputs(sampler)
    assert sampler["output"] == ["JODI_LATENT"]
    assert [ins[k][0] for k in ("model", "vae", "roles")] == ["JODI_MODEL", "JODI_VAE", "JODI_ROLES"]
    assert sampler["input"]["optional"]["positive"][0] == "CONDITIONING"
    assert sampler["input"]["optional"]["negative"][0] == "CONDITIONING"
    assert {ins[k][0] for k in ("steps", "seed", "width", "height", "batch_size")} == {"INT"}
    assert ins["cfg"][0] == "FLOAT" and ins["flow_shift"][0] == "FLOAT"
    assert len(_options(ins["sampler"])) >= 2  # DPM-Solver++ 2M and Euler (flow)

    decode = info["JodiDecode"]
    assert decode["output"][:8] == ["IMAGE"] * 8 and decode["output_name"][:8] == DOMAINS
    assert "MASK" in decode["output"]

    perception = info["JodiPerception"]
    assert _inputs(perception)["image"][0] == "IMAGE"
    assert perception["output_name"][:7] == DOMAINS[1:] and perception["output"][:7] == ["IMAGE"] * 7
    for name in ("JodiJointGeneration", "JodiControllableGeneration"):
        assert info[name]["output"][:8] == ["IMAGE"] * 8, name
    assert info["JodiLatentSplit"]["output"] == ["LATENT"]
    assert info["JodiLatentMerge"]["output"] == ["JODI_LATENT"]


CONTRACT = Path(__file__).with_name("node_contract.json")


def _contract(pack_nodes: dict) -> dict:
    """What saved workflows depend on: each node's inputs in widget order with their types, and its outputs."""
    def sockets(entry, section):
        specs = entry["input"].get(section, {})
        order = entry.get("input_order", {}).get(section, list(specs))
        return [f"{name}: {specs[name][0] if isinstance(specs[name][0], str) else 'COMBO'}" for name in order]

    return {name: {"category": entry["category"], "required": sockets(entry, "required"),
                   "optional": sockets(entry, "optional"),
                   "outputs": [f"{name}: {kind}" for kind, name in zip(entry["output"], entry["output_name"])]}
            for name, entry in sorted(pack_nodes.items())}


def test_object_info_matches_the_node_contract(pack_nodes):
    """Every pack node's sockets, in order, against tests/host/node_contract.json: a renamed, retyped or reordered
    input breaks the workflows people saved, so any change has to be deliberate (JODI_UPDATE_CONTRACT=1 rewrites the
    file; review its diff)."""
    actual = _contract(pack_nodes)
    if os.environ.get("JODI_UPDATE_CONTRACT") == "1":
        CONTRACT.write_text(json.dumps(actual, indent=1) + "\n")
    expected = json.loads(CONTRACT.read_text())
    assert sorted(actual) == sorted(expected), "nodes added or removed"
    for name in expected:
        assert actual[name] == expected[name], f"{name} changed its sockets"


def test_both_model_folders_are_offered(comfy, host_models):
    """Load Jodi Model lists models/diffusion_models and models/jodi (through folder_paths, so extra paths work)."""
    options = _options(_inputs(comfy.object_info()["JodiModelLoader"])["ckpt_name"])
    assert {host_models.jodi_file, host_models.jodi_pth_file} <= set(options), options
