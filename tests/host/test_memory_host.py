"""Memory management of the Jodi and Janus models in the real host.

The models are built from ComfyUI's comfy.ops, so its ModelPatcher can hold weights apart (on the offload device)
and cast them on use, as for core's models. The probe pack's JodiTestLowVram hands the sampler, the decoder and
Janus clones of the loaders' patchers that may load at most a tiny budget: ComfyUI's own partial ("lowvram") load
then runs, as on a GPU short of memory, and the outputs must equal those of the fully loaded models. The loaders'
weight_dtype stores the weights in fp8 and computes in the loader's dtype.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.host

DOMAINS = ("image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose")
WEIGHT_DTYPES = ["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
BUDGET_MB = 0.01  # far below every model's size: each one is loaded partially


def _jodi_graph(host_models, name: str, weight_dtype: str = "default", budget_mb: float | None = None) -> dict:
    """Loaders -> [JodiTestLowVram] -> Jodi Sampler (image and depth generated) -> Jodi Decode; latent and maps
    saved. Two domains: the tiny model works at 1024 px like the real one, where each decoded map costs seconds."""
    model, vae = ["1", 0], ["2", 0]
    graph = {
        "1": {"class_type": "JodiModelLoader", "inputs": {"ckpt_name": host_models.jodi_file, "dtype": "fp32",
                                                          "attention": "torch", "weight_dtype": weight_dtype}},
        "2": {"class_type": "JodiVAELoader", "inputs": {"vae_name": host_models.vae_file, "dtype": "fp32"}},
        "3": {"class_type": "JodiRoles", "inputs": {f"{d}_role": "generate" if d in ("image", "depth") else "ignore"
                                                    for d in DOMAINS}},
    }
    if budget_mb is not None:
        graph["8"] = {"class_type": "JodiTestLowVram", "inputs": {"model": model, "vae": vae, "budget_mb": budget_mb}}
        model, vae = ["8", 0], ["8", 1]
    graph.update({
        "4": {"class_type": "JodiSampler", "inputs": {
            "model": model, "vae": vae, "roles": ["3", 0], "aspect": "1:1", "width": 64, "height": 64, "steps": 2,
            "cfg": 1.0, "seed": 7, "sampler": "euler-flow", "flow_shift": 3.0, "batch_size": 1}},
        "5": {"class_type": "JodiDecode", "inputs": {"vae": vae, "jodi_latent": ["4", 0], "tiled_decode": False,
                                                     "mask_class": "person"}},
        "6": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["4", 0], "name": f"{name}_latent"}},
        "7": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["5", 0], "name": f"{name}_image"}},
        "9": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["5", 3], "name": f"{name}_depth"}},
    })
    return graph


def _run(comfy, graph: dict, name: str) -> tuple[dict, str]:
    """The saved tensors of a graph and the log lines it added."""
    before = len(comfy.log_text())
    comfy.run_prompt(graph)
    probe = comfy.output_dir / "jodi_probe"
    saved = {part: load_file(probe / f"{name}_{part}.safetensors") for part in ("latent", "image", "depth")}
    return saved, comfy.log_text()[before:]


def _partial_loads(log: str) -> list[str]:
    return re.findall(r"loaded partially[^\n]*", log)


def _assert_same(a: dict, b: dict) -> None:
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part} {key}"


def test_loaders_offer_weight_dtype_with_a_default(comfy):
    """Optional, with 'default': workflows and API prompts saved before it existed still load (the shipped
    workflows, whose API twins lack it, run in test_workflows_host)."""
    info = comfy.object_info()
    for node in ("JodiModelLoader", "JanusLoader"):
        spec = info[node]["input"]["optional"]["weight_dtype"]
        options = spec[0] if isinstance(spec[0], list) else spec[1]["options"]
        assert options == WEIGHT_DTYPES and spec[1]["default"] == "default", node
        assert "weight_dtype" not in info[node]["input"]["required"], node
    assert "weight_dtype" not in {**info["JodiVAELoader"]["input"]["required"],
                                  **info["JodiVAELoader"]["input"].get("optional", {})}


def test_dit_and_dcae_held_apart_give_the_same_maps(comfy, host_models):
    full, full_log = _run(comfy, _jodi_graph(host_models, "full"), "full")
    apart, apart_log = _run(comfy, _jodi_graph(host_models, "apart", budget_mb=BUDGET_MB), "apart")
    partial = _partial_loads(apart_log)
    # The DiT before sampling, the DC-AE for previews and for the decode: each loaded partially, the rest offloaded.
    assert len(partial) >= 2 and all("MB offloaded" in line for line in partial), apart_log[-3000:]
    assert not _partial_loads(full_log)
    _assert_same(full, apart)


@pytest.mark.parametrize("weight_dtype", ["fp8_e4m3fn", "fp8_e5m2"])
def test_fp8_weights_are_cast_on_use_held_apart_or_not(comfy, host_models, weight_dtype):
    """fp8 storage computes in the loader's dtype: loaded whole or partially, the same numbers; close to the
    default weights (fp8 rounds them), not equal."""
    name = weight_dtype.replace("_", "")
    whole, _ = _run(comfy, _jodi_graph(host_models, f"{name}whole", weight_dtype), f"{name}whole")
    apart, log = _run(comfy, _jodi_graph(host_models, f"{name}apart", weight_dtype, BUDGET_MB), f"{name}apart")
    assert _partial_loads(log), log[-3000:]
    _assert_same(whole, apart)
    default, _ = _run(comfy, _jodi_graph(host_models, "fp32ref"), "fp32ref")
    ref, got = default["latent"]["value.samples"], whole["latent"]["value.samples"]
    assert not torch.equal(ref, got)
    assert (got - ref).norm() / ref.norm() < 0.15  # 0.03 (e4m3) and 0.05 (e5m2) measured
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.99


def test_fast_fp8_runs_where_the_card_has_no_fp8_matmuls(comfy, host_models):
    """fp8_e4m3fn_fast on the CPU host: no fp8 matmuls there, so it stores fp8 and computes as fp8_e4m3fn does."""
    fast, log = _run(comfy, _jodi_graph(host_models, "fast", "fp8_e4m3fn_fast"), "fast")
    plain, _ = _run(comfy, _jodi_graph(host_models, "e4m3", "fp8_e4m3fn"), "e4m3")
    assert "has no fp8 matmuls" in log
    _assert_same(fast, plain)


def test_janus_held_apart_generates_the_same_image(comfy, host_models):
    def graph(name: str, budget_mb: float | None) -> dict:
        model = ["1", 0]
        g = {"1": {"class_type": "JanusLoader", "inputs": {"model_name": host_models.janus_dir, "dtype": "auto"}}}
        if budget_mb is not None:
            g["8"] = {"class_type": "JodiTestLowVram", "inputs": {"janus": model, "budget_mb": budget_mb}}
            model = ["8", 2]
        g["2"] = {"class_type": "JanusGenerate", "inputs": {"model": model, "prompt": "a red fox in the snow",
                                                            "cfg": 4.0, "temperature": 1.0, "seed": 11,
                                                            "batch_size": 1}}
        g["3"] = {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["2", 0], "name": name}}
        return g

    comfy.run_prompt(graph("janus_full", None))
    before = len(comfy.log_text())
    comfy.run_prompt(graph("janus_apart", BUDGET_MB))
    assert _partial_loads(comfy.log_text()[before:])
    probe = comfy.output_dir / "jodi_probe"
    full = load_file(probe / "janus_full.safetensors")["value"]
    apart = load_file(probe / "janus_apart.safetensors")["value"]
    assert torch.equal(full, apart)
