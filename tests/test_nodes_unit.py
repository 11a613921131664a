"""Fast tests of the ComfyUI node layer without ComfyUI.

- the ComfyUI-free node modules (vocabulary, layouts, payloads, map_conventions): layout conversions, roles, sizes,
  latents, map conventions;
- the pack imported the way ComfyUI imports it, against a small stand-in for ``comfy_api`` / ``comfy`` /
  ``folder_paths`` that records schemas and model-management calls: every node has a description, a category under
  Jodi/ or Janus/, a tooltip on every input; the nodes run end to end (roles -> sampler -> decode, shortcuts,
  utilities) on tiny stand-in modules; interrupts propagate; importing the pack stays light.
The real host (ComfyUI 0.3.75 server) is exercised in tests/host/.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from jodi_core import imaging, sampling
from jodi_core import loading as real_loading
from jodi_core.domains import DOMAIN_NAMES, LABEL_NAMES, SEG12_CLASSES, ade150_to_seg12, seg_palette
from pack_modules import pack_module

REPO = Path(__file__).resolve().parents[1]
vocabulary = pack_module("nodes.vocabulary")
layouts = pack_module("nodes.layouts")
map_conventions = pack_module("nodes.map_conventions")
payloads = pack_module("nodes.payloads")

# ---------------------------------------------------------------------------------------------------------------------
# The ComfyUI-free node modules
# ---------------------------------------------------------------------------------------------------------------------


def test_image_layout_round_trip():
    img = torch.rand(2, 5, 7, 3)
    x = layouts.image_to_bchw(img)
    assert x.shape == (2, 3, 5, 7)
    assert torch.equal(x[1, 2, 4, 6], img[1, 4, 6, 2])  # channel c of pixel (h, w) stays the same number
    assert torch.equal(layouts.bchw_to_image(x), img)


def test_image_layout_grey_alpha_and_errors():
    grey = torch.rand(1, 4, 4, 1)
    assert torch.equal(layouts.image_to_bchw(grey), grey.permute(0, 3, 1, 2).expand(1, 3, 4, 4))
    rgba = torch.rand(1, 4, 4, 4)
    assert torch.equal(layouts.image_to_bchw(rgba), rgba[..., :3].permute(0, 3, 1, 2))
    with pytest.raises(ValueError, match="IMAGE shaped"):
        layouts.image_to_bchw(torch.rand(1, 3, 8, 8, 2))
    with pytest.raises(ValueError, match="NaN"):
        layouts.image_to_bchw(torch.full((1, 2, 2, 3), float("nan")))
    with pytest.raises(TypeError):
        layouts.image_to_bchw([[0.5]])


def test_resolve_role_rules():
    assert vocabulary.resolve_role("depth", "auto", True) == "condition"
    assert vocabulary.resolve_role("depth", "auto", False) == "generate"
    assert vocabulary.resolve_role("depth", "ignore", True) == "ignore"
    with pytest.raises(ValueError, match="no depth image is connected"):
        vocabulary.resolve_role("depth", "condition", False)
    with pytest.raises(ValueError, match="depth_role must be one of"):
        vocabulary.resolve_role("depth", "sometimes", True)


def test_roles_payload_from_choices_batch_and_size():
    depth = torch.rand(3, 40, 24, 3)
    roles = payloads.RolesPayload.from_choices({"normal": "ignore"}, {"depth": depth, "edge": None})
    assert roles.roles == ("generate", "generate", "generate", "condition", "ignore", "generate", "generate",
                           "generate")
    assert set(roles.conditions) == {"depth"}
    assert roles.batch_size(1) == 3 and roles.batch_size(3) == 3
    with pytest.raises(ValueError, match="batch_size is 2"):
        roles.batch_size(2)
    assert roles.first_condition_size() == (40, 24)
    assert roles.condition_tensors()["depth"].shape == (3, 3, 40, 24)
    with pytest.raises(ValueError, match="No domain is set to generate"):
        payloads.RolesPayload(("condition",) + ("ignore",) * 7, {"image": depth})


def test_resolve_size_modes():
    assert vocabulary.resolve_size(vocabulary.ASPECT_AUTO, 512, 256, (40, 24), 1024) == (40, 24)
    assert vocabulary.resolve_size(vocabulary.ASPECT_AUTO, 512, 256, None, 1024) == (256, 512)
    assert vocabulary.resolve_size(vocabulary.ASPECT_CUSTOM, 512, 256, (40, 24), 1024) == (256, 512)
    assert vocabulary.resolve_size("16:9", 1, 1, None, 1024) == imaging.aspect_preset_size("16:9", 1024, 32)
    with pytest.raises(ValueError, match="aspect must be one of"):
        vocabulary.resolve_size("7:5", 64, 64, None, 1024)


def test_latent_payload_select_replace():
    samples = torch.randn(2, 8, 4, 3, 5)
    roles = torch.tensor([[0, 0, 2, 1, 0, 0, 0, 0]])
    lat = payloads.LatentPayload(samples, roles, 96, 160)
    assert lat.roles.shape == (2, 8) and "edge" not in lat.present()
    assert torch.equal(lat.select("depth"), samples[:, 3])
    with pytest.raises(ValueError, match="holds no edge"):
        lat.select("edge")
    new = torch.randn(1, 4, 3, 5)
    merged = lat.replace("edge", new)
    assert torch.equal(merged.samples[:, 2], new.expand(2, -1, -1, -1))
    assert torch.equal(merged.samples[:, 3], samples[:, 3]) and torch.equal(lat.samples, samples)
    assert "edge" in merged.present()
    with pytest.raises(ValueError, match="do not fit"):
        lat.replace("edge", torch.randn(1, 4, 6, 10))
    with pytest.raises(ValueError, match=r"\(B, 8, C, h, w\)"):
        payloads.LatentPayload(torch.randn(1, 7, 4, 3, 5), roles, 96, 160)


def test_depth_for_controlnet_keeps_near_bright_and_stretches():
    ramp = torch.linspace(0.2, 0.6, 16).reshape(1, 4, 4, 1).expand(1, 4, 4, 3)  # brighter = nearer in Jodi's maps
    out = map_conventions.depth_for_controlnet(ramp)
    flat = out[0, ..., 0].flatten()
    assert out.shape == (1, 4, 4, 3) and torch.all(flat[1:] > flat[:-1])  # order kept: near stays bright
    assert flat.min() == 0 and flat.max() == 1
    assert torch.allclose(map_conventions.depth_for_controlnet(ramp, invert=True), 1 - out)
    raw = map_conventions.depth_for_controlnet(ramp, normalize=False)
    assert torch.allclose(raw, ramp)


def test_flip_normal_mirrors_only_chosen_axes():
    n = torch.rand(1, 3, 3, 3)
    out = map_conventions.flip_normal(n, flip_green=True)
    assert torch.allclose(out[..., 1], 1 - n[..., 1])
    assert torch.equal(out[..., 0], n[..., 0]) and torch.equal(out[..., 2], n[..., 2])


def test_seg12_to_ade150_picks_a_member_of_each_class():
    to12 = ade150_to_seg12()
    rep = map_conventions.seg12_to_ade150()
    assert rep[0] == 0
    chosen = {"plant": 18, "furniture": 20}  # ADE "plant" and "chair", not "tree" and "bed"
    for c, name in enumerate(SEG12_CLASSES[1:], start=1):
        members = [a for a in range(1, 151) if int(to12[a]) == c]
        assert int(to12[rep[c]]) == c, name  # always an ADE class that maps back to the same Jodi class
        assert int(rep[c]) == chosen.get(name, min(members)), name


def test_seg_to_ade150_colours_and_index_image():
    classes = torch.arange(12).reshape(1, 3, 4)  # every Jodi class once
    seg = (seg_palette("colors12")[classes] / 255)  # (1, 3, 4, 3) IMAGE in the Jodi palette
    assert torch.equal(map_conventions.seg_index_from_image(seg), classes)
    colours, ade = map_conventions.seg_to_ade150(seg)
    assert torch.equal(ade, map_conventions.seg12_to_ade150()[classes])
    assert torch.allclose(colours * 255, seg_palette("colors150")[ade], atol=1e-3)
    index_img = layouts.index_to_index_image(ade)
    assert torch.equal((index_img[..., 0] * 255).round().long(), ade)
    mask = layouts.class_mask(classes, SEG12_CLASSES.index("sky"))
    assert mask.sum() == 1 and mask[0, 1, 2] == 1  # class 6 sits at row 1, column 2


def test_check_number_and_choice():
    assert vocabulary.check_number("steps", 20, 1, 100, integer=True) == 20
    for bad in (0, 101, 2.5, float("nan"), True, "3"):
        with pytest.raises(ValueError, match="steps"):
            vocabulary.check_number("steps", bad, 1, 100, integer=True)
    assert vocabulary.torch_dtype("bf16") is torch.bfloat16 and vocabulary.torch_dtype("auto") is None
    assert vocabulary.validation([lambda: vocabulary.check_choice("dtype", "bf16", vocabulary.DTYPE_CHOICES)]) is True
    assert vocabulary.validation([lambda: None, lambda: vocabulary.check_number("cfg", -1, 0, 10),
                                  lambda: vocabulary.check_number("steps", 0, 1, 10)]).startswith("cfg must be")


def test_sampler_labels_name_jodi_core_samplers():
    assert set(vocabulary.SAMPLERS.values()) == set(sampling.SAMPLERS)


# ---------------------------------------------------------------------------------------------------------------------
# A small stand-in for the parts of ComfyUI the nodes use
# ---------------------------------------------------------------------------------------------------------------------


class _Rec:
    def __init__(self, kind, io_type, id=None, *args, **kwargs):
        self.kind, self.io_type, self.id, self.args, self.kwargs = kind, io_type, id, args, kwargs


class _IOType:
    def __init__(self, name):
        self.name = name

    def Input(self, id, *args, **kwargs):
        return _Rec("input", self.name, id, *args, **kwargs)

    def Output(self, id=None, **kwargs):
        return _Rec("output", self.name, id, **kwargs)


class _NodeOutput:
    def __init__(self, *values, ui=None, **_):
        self.result, self.ui = values, ui


class _Events:
    """What the stand-in comfy modules saw."""

    def __init__(self):
        self.loaded, self.progress, self.interrupt_after = [], [], None
        self.full_loads, self.out_of_memory, self.dit_loads, self.vae_loads = [], False, [], []


def _make_stubs(models_dir: Path, events: _Events) -> dict[str, types.ModuleType]:
    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        m.__dict__.update(attrs)
        return m

    io = types.SimpleNamespace(
        ComfyNode=type("ComfyNode", (), {}), Schema=lambda **kw: types.SimpleNamespace(**kw),
        NodeOutput=_NodeOutput, Custom=_IOType,
        **{n: _IOType(n.upper()) for n in ("Image", "Mask", "Latent", "Conditioning", "Clip", "Int", "Float",
                                           "Boolean", "String", "Combo")},
    )

    class ComfyExtension:
        pass

    folders = {"jodi": ([str(models_dir / "jodi")], set()), "diffusion_models": ([str(models_dir / "dm")], {".pth"}),
               "vae": ([str(models_dir / "vae")], {".safetensors"})}

    def get_filename_list(name):
        paths, _ = folders[name]
        return sorted(p.name for d in paths for p in Path(d).glob("*") if p.is_file())

    def get_full_path(name, filename):
        for d in folders[name][0]:
            if (Path(d) / filename).is_file():
                return str(Path(d) / filename)
        return None

    class InterruptProcessingException(Exception):
        pass

    steps_seen = []

    def throw_exception_if_processing_interrupted():
        steps_seen.append(1)
        if events.interrupt_after is not None and len(steps_seen) > events.interrupt_after:
            raise InterruptProcessingException()

    class ModelPatcher:
        def __init__(self, model, load_device, offload_device, **_):
            self.model, self.load_device, self.offload_device = model, load_device, offload_device
            if getattr(model, "device", None) is None:  # as ComfyUI's ModelPatcher does
                model.device = offload_device

    def load_models_gpu(models, memory_required=0, force_full_load=False, **_):
        if events.out_of_memory:
            raise MemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        for patcher in models:
            patcher.model.device = patcher.load_device  # ComfyUI writes this after moving the weights
        events.loaded.append((list(models), memory_required))
        events.full_loads.append(force_full_load)

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            events.progress.append((value, total or self.total, preview))

    cpu = torch.device("cpu")
    mm = module(
        "comfy.model_management", get_torch_device=lambda: cpu, unet_offload_device=lambda: cpu,
        vae_device=lambda: cpu, vae_offload_device=lambda: cpu, intermediate_device=lambda: cpu,
        unet_dtype=lambda device=None, supported_dtypes=(), **_: torch.float32,
        vae_dtype=lambda device=None, allowed_dtypes=(): torch.float32,
        load_models_gpu=load_models_gpu, OOM_EXCEPTION=MemoryError,
        throw_exception_if_processing_interrupted=throw_exception_if_processing_interrupted,
        InterruptProcessingException=InterruptProcessingException,
    )
    comfy = module("comfy")
    stubs = {
        "comfy_api": module("comfy_api"),
        "comfy_api.v0_0_2": module("comfy_api.v0_0_2", io=io, ui=types.SimpleNamespace(),
                                   ComfyExtension=ComfyExtension),
        "folder_paths": module("folder_paths", models_dir=str(models_dir), folder_names_and_paths=folders,
                               supported_pt_extensions={".safetensors", ".pth", ".pt", ".ckpt", ".bin"},
                               get_filename_list=get_filename_list, get_full_path=get_full_path),
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.model_patcher": module("comfy.model_patcher", ModelPatcher=ModelPatcher),
        "comfy.utils": module("comfy.utils", ProgressBar=ProgressBar),
        "comfy.cli_args": module("comfy.cli_args", args=types.SimpleNamespace(preview_method="auto", preview_size=64),
                                 LatentPreviewMethod=types.SimpleNamespace(NoPreviews="none")),
    }
    comfy.model_management, comfy.model_patcher, comfy.utils = mm, stubs["comfy.model_patcher"], stubs["comfy.utils"]
    return stubs


class _Cfg:
    def __init__(self, **kw):
        self.__dict__.update(kw)


class TinyDiT(nn.Module):
    """Stand-in with the transformer interface JodiPipeline calls (prepare, forward_prepared, stored null caption)."""

    def __init__(self, channels=4, caption=16):
        super().__init__()
        self.config = _Cfg(base_size=8, patch_size=1, in_channels=channels, caption_channels=caption, hidden_size=8,
                           model_max_length=300)
        self.proj = nn.Conv2d(channels, channels, 1)
        self.y_embedder = nn.Module()
        self.y_embedder.register_buffer("y_embedding", torch.randn(300, caption))

    @property
    def device(self):  # read-only, like jodi_core's modules: the patcher must not write onto it
        return self.proj.weight.device

    def prepare(self, roles, y, mask):
        return {"y": None if y is None else y.float().mean((1, 2, 3))}

    def forward_prepared(self, x, timestep, ctx, clean_x=None):
        B, L, C, h, w = x.shape
        v = self.proj(x.reshape(B * L, C, h, w)).reshape(B, L, C, h, w)  # (B*L, C, h, w) -> (B, L, C, h, w)
        return v if ctx["y"] is None else v + ctx["y"].reshape(-1, 1, 1, 1, 1)


class TinyAE(nn.Module):
    spatial_compression = 8

    def __init__(self, channels=4):
        super().__init__()
        self.config = _Cfg(scaling_factor=0.41407)
        self.tiled_calls = []  # (encode|decode, tiled) per call
        self.tile_sizes = []  # tile_size per decode call
        self.out_of_memory_untiled = False
        self.enc = nn.Conv2d(3, channels, 8, 8)
        self.dec = nn.ConvTranspose2d(channels, 3, 8, 8)

    def encode(self, x, tiled=False):
        self.tiled_calls.append(("encode", tiled))
        return self.enc(x)

    def decode(self, z, tiled=False, tile_size=None, overlap=None):
        self.tiled_calls.append(("decode", tiled))
        self.tile_sizes.append(tile_size)
        if self.out_of_memory_untiled and not tiled:
            raise MemoryError("CUDA out of memory (stand-in)")  # the stand-in's OOM_EXCEPTION
        return torch.tanh(self.dec(z))


def install_pack(tmp_path: Path, monkeypatch, models: Path, events: _Events) -> tuple[str, types.ModuleType]:
    """Import the pack as ComfyUI does (a package named by its path) against stand-ins of ComfyUI's modules."""
    for stub_name, stub in _make_stubs(models, events).items():
        monkeypatch.setitem(sys.modules, stub_name, stub)
    name = str(tmp_path / "custom_nodes" / "ComfyUI-Jodi")
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)
    spec.loader.exec_module(module)
    return name, module


def pack_nodes(module: types.ModuleType) -> dict:
    """node_id -> node class, from the pack's comfy_entrypoint."""
    ext = asyncio.run(module.comfy_entrypoint())
    return {cls.define_schema().node_id: cls for cls in asyncio.run(ext.get_node_list())}


def unload_pack(name: str) -> None:
    for key in [k for k in sys.modules if k.startswith(name)]:
        sys.modules.pop(key, None)


@pytest.fixture
def pack(tmp_path, monkeypatch):
    """The pack loaded like ComfyUI loads it (module named by its path), against the stand-ins."""
    for d in ("jodi", "dm", "vae"):
        (tmp_path / "models" / d).mkdir(parents=True)
    (tmp_path / "models" / "jodi" / "tiny.pth").write_bytes(b"x")
    (tmp_path / "models" / "vae" / "tiny-ae.safetensors").write_bytes(b"x")
    events = _Events()
    name, module = install_pack(tmp_path, monkeypatch, tmp_path / "models", events)
    loading = types.ModuleType(name + ".jodi_core.loading")
    loading.__dict__.update({k: v for k, v in vars(real_loading).items() if not k.startswith("__")})
    def load_jodi(path, dtype=None, device="cpu", attention_backend="auto", weight_dtype="default", operations=None):
        events.dit_loads.append({"path": path, "dtype": dtype, "attention_backend": attention_backend})
        return TinyDiT().to(device, dtype)

    loading.load_jodi = load_jodi
    def load_dcae(path, dtype=None, device="cpu", attention_backend="auto", weight_dtype="default", operations=None):
        events.vae_loads.append({"path": path, "dtype": dtype, "attention_backend": attention_backend})
        return TinyAE().to(device, dtype)

    loading.load_dcae = load_dcae
    monkeypatch.setitem(sys.modules, loading.__name__, loading)
    payloads = sys.modules[name + ".nodes.payloads"]  # the pack's own copy: its classes are what the nodes accept
    yield types.SimpleNamespace(module=module, nodes=pack_nodes(module), events=events, models=tmp_path / "models",
                                payloads=payloads)
    unload_pack(name)



def test_every_node_is_documented(pack):
    expected = {"JodiModelLoader", "JodiVAELoader", "JodiRoles", "JodiSampler", "JodiDecode", "JodiJointGeneration",
                "JodiControllableGeneration", "JodiPerception", "JodiDepthToControlNet", "JodiNormalConvention",
                "JodiSegToADE20K", "JodiSegClassMask", "JodiLatentSplit", "JodiLatentMerge", "JodiTextEncode"}
    assert expected <= set(pack.nodes)
    for node_id, cls in pack.nodes.items():
        schema = cls.define_schema()
        assert node_id.startswith(("Jodi", "Janus")), node_id
        assert schema.category.split("/")[0] in ("Jodi", "Janus") and "/" in schema.category, node_id
        assert len(schema.description) > 40, node_id
        ids = [i.id for i in schema.inputs]
        assert len(ids) == len(set(ids)), node_id
        for inp in schema.inputs:
            assert inp.kwargs.get("tooltip"), f"{node_id}.{inp.id} has no tooltip"
        for out in schema.outputs:
            assert out.kwargs.get("tooltip") and out.kwargs.get("display_name"), node_id


def test_model_folders_registered_and_listed(pack):
    fp = sys.modules["folder_paths"]
    assert str(pack.models / "Janus-Pro") in fp.folder_names_and_paths["Janus-Pro"][0]
    assert fp.folder_names_and_paths["jodi"][1]  # restricted to weight files, not "everything"
    combo = pack.nodes["JodiModelLoader"].define_schema().inputs[0]
    assert combo.kwargs["options"] == [vocabulary.DEMO_MODEL_CHOICE, "tiny.pth"]


def test_loader_errors_are_clear(pack):
    loader = pack.nodes["JodiModelLoader"]
    assert "ckpt_name must be one of" in loader.validate_inputs(ckpt_name="missing.pth")
    assert loader.validate_inputs(ckpt_name="tiny.pth", dtype="auto", attention="torch") is True
    assert "attention" in loader.validate_inputs(attention="cuda")


def test_loader_passes_its_choices_to_jodi_core(pack):
    pack.nodes["JodiModelLoader"].execute("tiny.pth", "fp16", "triton")
    load = pack.events.dit_loads[-1]
    assert load["path"].endswith("tiny.pth") and load["dtype"] == torch.float16
    assert load["attention_backend"] == "triton"
    pack.nodes["JodiVAELoader"].execute("tiny-ae.safetensors", "fp16", "torch")
    load = pack.events.vae_loads[-1]
    assert load["path"].endswith("tiny-ae.safetensors") and load["dtype"] == torch.float16
    assert load["attention_backend"] == "torch"
    pack.nodes["JodiVAELoader"].execute("tiny-ae.safetensors", "auto")  # workflows saved before the input existed
    assert pack.events.vae_loads[-1]["attention_backend"] == "auto"
    assert "attention" in pack.nodes["JodiVAELoader"].validate_inputs(attention="flash")


def _load(pack):
    model = pack.nodes["JodiModelLoader"].execute("tiny.pth", "auto", "torch").result[0]
    vae = pack.nodes["JodiVAELoader"].execute("tiny-ae.safetensors", "auto").result[0]
    return model, vae


SAMPLING = dict(steps=3, cfg=4.5, seed=5, sampler="dpm++2m-flow", flow_shift=3.0)


def test_roles_sampler_decode_chain(pack):
    model, vae = _load(pack)
    roles_node = pack.nodes["JodiRoles"]
    assert "no depth image is connected" in roles_node.validate_inputs(depth_role="condition")
    assert roles_node.validate_inputs(depth=None, depth_role="condition") is True  # linked inputs arrive as None
    depth = torch.rand(1, 40, 56, 3)
    roles = roles_node.execute(depth=depth, normal_role="ignore").result[0]
    latent = pack.nodes["JodiSampler"].execute(model, vae, roles, aspect=vocabulary.ASPECT_AUTO, width=64, height=64,
                                               batch_size=2, **SAMPLING).result[0]
    assert (latent.height, latent.width, latent.batch) == (40, 56, 2)
    assert pack.events.loaded and pack.events.loaded[-1][0] == [model, vae]
    assert [p[0] for p in pack.events.progress] == [1, 2, 3]
    assert pack.events.progress[-1][2][0] == "JPEG"  # previews are on in the stand-in's args
    outs = pack.nodes["JodiDecode"].execute(vae, latent, False, "sky").result
    assert len(outs) == 10
    for img in outs[:9]:
        assert img.shape == (2, 40, 56, 3) and img.dtype == torch.float32 and 0 <= img.min() <= img.max() <= 1
    assert outs[4].abs().sum() == 0  # normal was ignored: black
    assert outs[9].shape == (2, 40, 56) and set(outs[9].unique().tolist()) <= {0.0, 1.0}
    # same seed, same result; the next seed differs
    again = pack.nodes["JodiSampler"].execute(model, vae, roles, aspect=vocabulary.ASPECT_AUTO, width=64, height=64,
                                              batch_size=2, **SAMPLING).result[0]
    assert torch.equal(again.samples, latent.samples)
    assert not torch.equal(latent.samples[0, 0], latent.samples[1, 0])


def test_models_load_whole_and_running_out_of_memory_says_what_to_do(pack):
    model, vae = _load(pack)
    roles = pack.payloads.RolesPayload(("generate",) * 8)
    kwargs = dict(aspect=vocabulary.ASPECT_CUSTOM, width=64, height=64, batch_size=1, **SAMPLING)
    latent = pack.nodes["JodiSampler"].execute(model, vae, roles, **kwargs).result[0]
    pack.nodes["JodiDecode"].execute(vae, latent, False, "sky")
    assert pack.events.full_loads and all(pack.events.full_loads)  # never a partial ("lowvram") load
    pack.events.out_of_memory = True
    try:
        with pytest.raises(RuntimeError, match=r"Not enough GPU memory to load .*smaller dtype"):
            pack.nodes["JodiSampler"].execute(model, vae, roles, **kwargs)
    finally:
        pack.events.out_of_memory = False


def test_a_run_too_big_for_free_memory_is_refused_before_anything_loads(pack, monkeypatch):
    """8192 x 8192 is allowed by the inputs; on a machine without the RAM for its maps it must be a Python error
    (ComfyUI's get_free_memory is what the nodes ask), not an OOM kill of the server."""
    model, vae = _load(pack)
    mm = sys.modules["comfy.model_management"]
    asked = []

    def get_free_memory(dev=None, torch_free_too=False):
        asked.append(torch.device(dev))
        return 4 << 30  # 4 GB

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory, raising=False)
    monkeypatch.setattr(mm, "load_models_gpu", lambda *a, **k: pytest.fail("models loaded before the memory check"))
    big = dict(aspect=vocabulary.ASPECT_CUSTOM, width=8192, height=8192, batch_size=1, tiled_decode=False,
               mask_class="person", **SAMPLING)
    with pytest.raises(MemoryError, match=r"Not enough RAM for this Jodi run \(8192x8192 output, 8 maps, batch 1\)"
                                          r".*smaller output size.*fewer maps"):
        pack.nodes["JodiJointGeneration"].execute(model, vae, **big)
    assert asked and all(d.type == "cpu" for d in asked) and not pack.events.progress
    latent = pack.payloads.LatentPayload(torch.zeros(1, 8, 4, 8, 8), torch.zeros(1, 8, dtype=torch.long), 8192, 8192)
    with pytest.raises(MemoryError, match="Not enough RAM"):
        pack.nodes["JodiDecode"].execute(vae, latent, False, "person")
    # What fits goes ahead, and ComfyUI is asked to make room on the device for the estimate, not just the DiT.
    loads = []
    monkeypatch.setattr(mm, "load_models_gpu", lambda models, memory_required=0, **k: loads.append(memory_required))
    pack.nodes["JodiJointGeneration"].execute(model, vae, **{**big, "width": 64, "height": 64})
    assert loads and loads[0] > 0  # the run's own load carries its estimate


def test_sampler_rejects_bad_values_and_foreign_conditioning(pack):
    model, vae = _load(pack)
    roles = pack.payloads.RolesPayload(("generate",) * 8)
    sampler = pack.nodes["JodiSampler"]
    assert "sampler must be one of" in sampler.validate_inputs(sampler="ddim")
    kwargs = dict(aspect=vocabulary.ASPECT_CUSTOM, width=64, height=64, batch_size=1, **SAMPLING)
    with pytest.raises(ValueError, match="steps must be between"):
        sampler.execute(model, vae, roles, **{**kwargs, "steps": 0})
    with pytest.raises(ValueError, match="Jodi Text Encode"):
        sampler.execute(model, vae, roles, positive=[[torch.randn(1, 77, 768), {}]], **kwargs)
    with pytest.raises(TypeError, match="Jodi Roles"):
        sampler.execute(model, vae, "roles", **kwargs)


def test_sampler_with_caption_uses_cfg_and_checks_width(pack):
    model, vae = _load(pack)
    roles = pack.payloads.RolesPayload(("generate",) * 8)
    te = sys.modules[pack.module.__name__ + ".nodes.text_encode"]
    cond = [[torch.randn(1, 300, 16), {"attention_mask": torch.ones(1, 300, dtype=torch.long), te.CAPTION_KEY: {}}]]
    kwargs = dict(aspect=vocabulary.ASPECT_CUSTOM, width=64, height=64, batch_size=1, **SAMPLING)
    with_text = pack.nodes["JodiSampler"].execute(model, vae, roles, positive=cond, **kwargs).result[0]
    without = pack.nodes["JodiSampler"].execute(model, vae, roles, **kwargs).result[0]
    assert not torch.equal(with_text.samples, without.samples)
    # Without a negative, the "" caption Jodi Text Encode attaches is the unconditional branch, as in the reference.
    null = torch.randn(1, 300, 16)
    with_null = [[cond[0][0], {**cond[0][1], te.CAPTION_KEY: {"null": null}}]]
    implicit = pack.nodes["JodiSampler"].execute(model, vae, roles, positive=with_null, **kwargs).result[0]
    explicit = pack.nodes["JodiSampler"].execute(model, vae, roles, positive=cond,
                                                 negative=[[null, {te.CAPTION_KEY: {}}]], **kwargs).result[0]
    assert torch.equal(implicit.samples, explicit.samples)
    assert not torch.equal(implicit.samples, with_text.samples)  # (with_text fell back to the stored null)
    wide = [[torch.randn(1, 300, 32), cond[0][1]]]
    with pytest.raises(ValueError, match="channels but this Jodi model takes 16"):
        pack.nodes["JodiSampler"].execute(model, vae, roles, positive=wide, **kwargs)


def test_interrupt_stops_sampling(pack):
    model, vae = _load(pack)
    pack.events.interrupt_after = 2
    mm = sys.modules["comfy.model_management"]
    with pytest.raises(mm.InterruptProcessingException):
        pack.nodes["JodiJointGeneration"].execute(model, vae, aspect=vocabulary.ASPECT_CUSTOM, width=64, height=64,
                                                  batch_size=1, tiled_decode=False, mask_class="person",
                                                  **{**SAMPLING, "steps": 10})
    assert len(pack.events.progress) < 10


def test_tiled_decode_reaches_the_autoencoder(pack):
    model, vae = _load(pack)
    ae = vae.model.module  # the ModelPatcher's ManagedModule holds the jodi_core autoencoder
    roles = pack.payloads.RolesPayload(("generate",) * 8)
    jodi_latent = pack.nodes["JodiSampler"].execute(model, vae, roles, aspect=vocabulary.ASPECT_CUSTOM, width=64,
                                                    height=64, batch_size=1, **SAMPLING).result[0]
    for tiled in (True, False):
        ae.tiled_calls.clear()
        pack.nodes["JodiDecode"].execute(vae, jodi_latent, tiled_decode=tiled, mask_class="person")
        assert ae.tiled_calls and all(t is tiled for kind, t in ae.tiled_calls if kind == "decode"), ae.tiled_calls
    ae.tiled_calls.clear()
    pack.nodes["JodiPerception"].execute(model, vae, torch.rand(1, 64, 64, 3), steps=1, seed=0,
                                         sampler="euler-flow", flow_shift=3.0, tiled_decode=True, mask_class="person")
    assert ae.tiled_calls[-1] == ("decode", True)  # the maps (a step preview before them may decode untiled)


def _run_module(pack):
    return sys.modules[pack.module.__name__ + ".nodes.run"]


def test_step_and_decode_each_load_with_their_own_estimate(pack):
    """ComfyUI makes room for the DiT's step before sampling and for the decoder's before decoding, in two loads:
    the decode may offload the DiT, and neither phase is asked to reserve the other's peak."""
    model, vae = _load(pack)
    run = _run_module(pack)
    pack.events.loaded.clear()
    pack.nodes["JodiJointGeneration"].execute(model, vae, aspect=vocabulary.ASPECT_CUSTOM, width=64, height=64,
                                              batch_size=2, tiled_decode=False, mask_class="person", **SAMPLING)
    (step_models, step_need), (decode_models, decode_need) = pack.events.loaded
    assert step_models == [model, vae]  # the stand-in host has previews on: the DC-AE decodes one map per step
    assert decode_models == [vae]
    pipe = sys.modules[pack.module.__name__ + ".jodi_core.pipeline"].JodiPipeline(model.model.module, vae.model.module)
    plan = sys.modules[pack.module.__name__ + ".jodi_core.domains"].plan_roles(("generate",) * 8, 2)
    step = pipe.memory_needs(2, plan, 64, 64, False, decode=False)[torch.device("cpu")]
    assert step_need >= step and step_need < step + pipe._dcae_activations(1, 64, 64, False) + (1 << 20)
    work = pipe.working_size(64, 64)
    expected = run.decode_needs(vae, 2, plan, 64, 64, work, plan.generated, tiled=False)[torch.device("cpu")]
    assert decode_need == expected


def _big_latent(pack, size=1024):
    """A latent of 8 decoded maps at ``size`` px for the stand-in autoencoder (x8: ``size / 8`` latent pixels)."""
    return pack.payloads.LatentPayload(torch.zeros(1, 8, 4, size // 8, size // 8), torch.zeros(1, 8, dtype=torch.long),
                                       size, size)


def test_decode_goes_to_tiles_when_its_estimate_does_not_fit(pack, monkeypatch, caplog):
    _, vae = _load(pack)
    run, mm = _run_module(pack), sys.modules["comfy.model_management"]
    ae, latent = vae.model.module, _big_latent(pack, 2048)
    cpu = torch.device("cpu")

    def need(tile):
        return run.decode_needs(vae, 1, latent.roles, 2048, 2048, (2048, 2048), range(8), tile is not None,
                                tile_size=tile)[cpu]

    whole, tiles, half = need(None), need(1024), need(512)
    assert whole > tiles > half  # smaller tiles, fewer activations at once
    for free, expected in (((whole + tiles) // 2, 1024), ((tiles + half) // 2, 512)):
        monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: free, raising=False)
        ae.tiled_calls.clear(), ae.tile_sizes.clear()
        caplog.clear()
        with caplog.at_level("INFO"):
            pack.nodes["JodiDecode"].execute(vae, latent, tiled_decode=False, mask_class="person")
        assert ae.tiled_calls == [("decode", True)] * 8 and set(ae.tile_sizes) == {expected}
        assert f"in {expected} px tiles" in caplog.text and "an untiled decode needs about" in caplog.text
    # What fits nowhere is refused before it starts, naming what to change.
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: 1 << 20, raising=False)
    with pytest.raises(MemoryError, match="Not enough RAM"):
        pack.nodes["JodiDecode"].execute(vae, latent, tiled_decode=False, mask_class="person")


def test_decode_that_runs_out_of_memory_retries_in_tiles(pack, caplog):
    _, vae = _load(pack)
    ae = vae.model.module
    ae.out_of_memory_untiled = True
    with caplog.at_level("WARNING"):
        outs = pack.nodes["JodiDecode"].execute(vae, _big_latent(pack, 256), tiled_decode=False,
                                                mask_class="person").result
    assert outs[0].shape == (1, 256, 256, 3)
    assert ae.tiled_calls[:2] == [("decode", False), ("decode", True)]  # the first map failed, then tiles for all
    assert all(t for _, t in ae.tiled_calls[1:]) and "ran out of memory decoding" in caplog.text


def test_loaders_build_from_host_ops_and_load_like_core_models(pack, monkeypatch):
    """Where jodi_core's loaders take ``operations``, the models are built from comfy.ops (picked as core's
    UNETLoader picks them), wrapped in the host's CoreModelPatcher and loaded without force_full_load."""
    picked, built = [], []
    ops = types.SimpleNamespace(name="host ops")

    def pick_operations(weight_dtype, compute_dtype, load_device=None, disable_fast_fp8=False,
                        fp8_optimizations=False, model_config=None):
        picked.append((weight_dtype, compute_dtype, load_device, fp8_optimizations))
        return ops

    class CoreModelPatcher(sys.modules["comfy.model_patcher"].ModelPatcher):
        pass

    comfy_ops = types.ModuleType("comfy.ops")
    comfy_ops.pick_operations = pick_operations
    monkeypatch.setitem(sys.modules, "comfy.ops", comfy_ops)
    monkeypatch.setattr(sys.modules["comfy"], "ops", comfy_ops, raising=False)
    monkeypatch.setattr(sys.modules["comfy.model_patcher"], "CoreModelPatcher", CoreModelPatcher, raising=False)
    loading = sys.modules[pack.module.__name__ + ".jodi_core.loading"]

    def load_jodi(path, dtype=None, device="cpu", attention_backend="auto", weight_dtype="default", operations=None):
        built.append(("dit", weight_dtype, operations))
        return TinyDiT().to(device, dtype)

    def load_dcae(path, dtype=None, device="cpu", attention_backend="auto", weight_dtype="default", operations=None):
        built.append(("vae", operations))
        return TinyAE().to(device, dtype)

    monkeypatch.setattr(loading, "load_jodi", load_jodi)
    monkeypatch.setattr(loading, "load_dcae", load_dcae)
    model, vae = _load(pack)
    assert built == [("dit", "default", ops), ("vae", ops)]
    assert picked == [(torch.float32, torch.float32, torch.device("cpu"), False)] * 2  # compute == storage dtype
    assert type(model) is CoreModelPatcher and model.model.host_ops and model.model.manual_cast_dtype is None
    pack.events.full_loads.clear()
    pack.nodes["JodiJointGeneration"].execute(model, vae, aspect=vocabulary.ASPECT_CUSTOM, width=64, height=64,
                                              batch_size=1, tiled_decode=False, mask_class="person", **SAMPLING)
    assert pack.events.full_loads == [False, False]  # ComfyUI may load them partially
    # A workflow saved before weight_dtype existed loads with the default; a bad value is named.
    assert pack.nodes["JodiModelLoader"].validate_inputs(ckpt_name="tiny.pth", weight_dtype="default") is True
    assert "weight_dtype must be one of" in pack.nodes["JodiModelLoader"].validate_inputs(weight_dtype="int4")


def test_fp8_weight_dtype_reaches_jodi_core(pack, monkeypatch):
    loading = sys.modules[pack.module.__name__ + ".jodi_core.loading"]
    seen = []

    def load_jodi(path, dtype=None, device="cpu", attention_backend="auto", weight_dtype="default", operations=None):
        seen.append((dtype, weight_dtype))
        return TinyDiT().to(device, dtype)

    monkeypatch.setattr(loading, "load_jodi", load_jodi)
    from jodi_core import ops as core_ops

    patcher = pack.nodes["JodiModelLoader"].execute("tiny.pth", "auto", "torch", "fp8_e5m2").result[0]
    assert seen[-1] == (torch.float32, "fp8_e5m2")  # computed in the dtype choice, stored as weight_dtype says
    assert patcher.model.manual_cast_dtype in (None, torch.float32)  # set where the host's ops cast on use
    assert core_ops.storage_dtype("fp8_e5m2") == torch.float8_e5m2


def test_weights_comfy_ops_cannot_cast_follow_a_partial_load(pack):
    """After a partial load the parameters of modules with children, buffers and plain torch layers go to the load
    device (jodi_core reads them directly); comfy.ops layers stay where the patcher put them (cast on use)."""
    common = sys.modules[pack.module.__name__ + ".nodes.common"]
    cast = nn.Linear(4, 4)
    cast.comfy_cast_weights = True  # what comfy.ops layers carry
    root = nn.Module()
    root.cast, root.norm = cast, nn.LayerNorm(4)
    root.table = nn.Parameter(torch.zeros(6, 4))
    root.register_buffer("y", torch.zeros(3))
    patcher = types.SimpleNamespace(model=types.SimpleNamespace(modules=root.modules, model_loaded_weight_memory=0))
    common._loose_weights_to_device(patcher, "meta", 1000, False, True)  # a full load moved everything itself
    assert root.table.device.type == "cpu"
    common._loose_weights_to_device(patcher, "meta", 1000, False, False)
    assert {n: p.device.type for n, p in root.named_parameters()} == {
        "table": "meta", "cast.weight": "cpu", "cast.bias": "cpu", "norm.weight": "meta", "norm.bias": "meta"}
    assert root.y.device.type == "meta"
    assert patcher.model.model_loaded_weight_memory == (24 + 8 + 3) * 4
    patcher.is_dynamic = lambda: True  # dynamic VRAM places them itself
    root.table = nn.Parameter(torch.zeros(6, 4))
    common._loose_weights_to_device(patcher, "meta", 1000, False, False)
    assert root.table.device.type == "cpu"


def test_shortcuts(pack):
    model, vae = _load(pack)
    photo = torch.rand(2, 48, 80, 3)
    outs = pack.nodes["JodiPerception"].execute(model, vae, photo, steps=2, seed=0, sampler="euler-flow",
                                                flow_shift=3.0, depth=False, tiled_decode=False,
                                                mask_class="person").result
    assert len(outs) == len(LABEL_NAMES) + 2
    assert all(o.shape[:3] == (2, 48, 80) for o in outs)
    assert outs[LABEL_NAMES.index("depth")].abs().sum() == 0 and outs[0].abs().sum() > 0
    with pytest.raises(ValueError, match="at least one label"):
        pack.nodes["JodiPerception"].execute(model, vae, photo, steps=2, seed=0, sampler="euler-flow",
                                             flow_shift=3.0, **{n: False for n in LABEL_NAMES})
    ctrl = pack.nodes["JodiControllableGeneration"]
    edge = torch.rand(1, 64, 96, 3)
    seg = seg_palette("colors12")[torch.randint(0, 12, (1, 32, 48))] / 255
    outs = ctrl.execute(model, vae, edge=edge, segmentation=seg, aspect=vocabulary.ASPECT_AUTO, width=64, height=64,
                        batch_size=1, tiled_decode=False, mask_class="person", unconnected_labels="ignore",
                        **SAMPLING).result
    assert outs[0].shape == (1, 64, 96, 3) and outs[0].abs().sum() > 0
    assert torch.allclose(outs[DOMAIN_NAMES.index("edge")], edge)  # conditions come back as given, not re-decoded
    assert torch.equal((outs[8][..., 0] * 255).round().long(),  # the seg condition's class map, at output size
                       map_conventions.seg_index_from_image(outs[DOMAIN_NAMES.index("segmentation")]))
    assert outs[DOMAIN_NAMES.index("depth")].abs().sum() == 0  # unconnected label ignored
    with pytest.raises(ValueError, match="at least one connected label"):
        ctrl.execute(model, vae, aspect=vocabulary.ASPECT_AUTO, width=64, height=64, batch_size=1, **SAMPLING)
    joint = pack.nodes["JodiJointGeneration"].execute(model, vae, aspect="16:9", width=64, height=64, batch_size=1,
                                                      tiled_decode=False, mask_class="person", **SAMPLING).result
    h, w = imaging.aspect_preset_size("16:9", 64, 8)  # TinyDiT: base 8 latents x compression 8
    assert all(o.shape[1:3] == (h, w) for o in joint[:9])


def test_utility_nodes_and_latent_split_merge(pack):
    n = pack.nodes
    depth = torch.rand(1, 8, 8, 3)
    assert n["JodiDepthToControlNet"].execute(depth, False, True).result[0].shape == (1, 8, 8, 3)
    assert n["JodiNormalConvention"].execute(depth, True).result[0].shape == (1, 8, 8, 3)
    seg = seg_palette("colors12")[torch.randint(0, 12, (1, 8, 8))] / 255
    colours, index_img = n["JodiSegToADE20K"].execute(seg).result
    assert colours.shape == index_img.shape == (1, 8, 8, 3)
    mask = n["JodiSegClassMask"].execute(seg, "sky").result[0]
    assert torch.equal(mask, (map_conventions.seg_index_from_image(seg) == SEG12_CLASSES.index("sky")).float())
    lat = pack.payloads.LatentPayload(torch.randn(1, 8, 4, 2, 3), torch.tensor([[0, 2, 0, 0, 0, 0, 0, 0]]), 16, 24)
    part = n["JodiLatentSplit"].execute(lat, "depth").result[0]
    assert torch.equal(part["samples"], lat.samples[:, 3])
    merged = n["JodiLatentMerge"].execute(lat, part, "lineart").result[0]
    assert torch.equal(merged.samples[:, 1], lat.samples[:, 3]) and merged.roles[0, 1] != 2
    assert "domain must be one of" in n["JodiLatentSplit"].validate_inputs(domain="rgb")


# ---------------------------------------------------------------------------------------------------------------------
# Import cost and the pytest guard
# ---------------------------------------------------------------------------------------------------------------------


def test_pack_import_is_light_and_guarded():
    """Without ComfyUI the root __init__ imports nothing; with the stand-ins, importing the pack pulls in no heavy
    optional library (transformers, diffusers, triton) and no model code."""
    script = f"""
import importlib.util, sys, json
sys.path.insert(0, {str(REPO / 'tests')!r})
spec = importlib.util.spec_from_file_location("packguard", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["packguard"] = m; spec.loader.exec_module(m)
bare = not hasattr(m, "comfy_entrypoint") and "packguard.nodes" not in sys.modules
from pathlib import Path
import tempfile, test_nodes_unit as t
tmp = Path(tempfile.mkdtemp())
sys.modules.update(t._make_stubs(tmp, t._Events()))
spec = importlib.util.spec_from_file_location("packreal", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
m = importlib.util.module_from_spec(spec); sys.modules["packreal"] = m; spec.loader.exec_module(m)
heavy = sorted(k for k in sys.modules if k.split(".")[0] in ("transformers", "diffusers", "triton")
               or k.startswith("packreal.jodi_core.") and k[len("packreal.jodi_core."):] in ("dit.model", "dcae",
               "dcae.model", "loading", "pipeline", "janus", "gemma"))
print(json.dumps({{"bare": bare, "entry": hasattr(m, "comfy_entrypoint"), "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"bare": True, "entry": True, "heavy": []}


def test_demo_choice_resolves_through_jodi_core_demo(pack, monkeypatch):
    """The built-in choice goes through jodi_core.jobs.demo.demo_model_paths(); its FileNotFoundError reaches the
    user."""
    demo = types.ModuleType(pack.module.__name__ + ".jodi_core.jobs.demo")
    files = (pack.models / "jodi" / "tiny.pth", pack.models / "vae" / "tiny-ae.safetensors")
    demo.demo_model_paths = lambda: files
    monkeypatch.setitem(sys.modules, demo.__name__, demo)
    jobs = importlib.import_module(pack.module.__name__ + ".jodi_core.jobs")
    monkeypatch.setattr(jobs, "demo", demo, raising=False)
    common = sys.modules[pack.module.__name__ + ".nodes.common"]
    assert common.resolve_dit_path(vocabulary.DEMO_MODEL_CHOICE) == str(files[0])
    assert common.resolve_vae_path(vocabulary.DEMO_MODEL_CHOICE) == str(files[1])
    loaded = pack.nodes["JodiModelLoader"].execute(vocabulary.DEMO_MODEL_CHOICE, "auto", "auto")
    assert loaded.result[0].model is not None

    def missing():
        raise FileNotFoundError("demo weights not downloaded")

    demo.demo_model_paths = missing
    with pytest.raises(FileNotFoundError, match="demo weights not downloaded"):
        pack.nodes["JodiVAELoader"].execute(vocabulary.DEMO_MODEL_CHOICE, "auto")


def test_segmentation_nodes_take_the_class_index_image_too():
    classes = torch.arange(12).reshape(1, 3, 4)
    palette_image = layouts.bchw_to_image(seg_palette("colors12")[classes].permute(0, 3, 1, 2) / 255)
    index_image = layouts.index_to_index_image(classes)  # what the seg_classes outputs give
    assert torch.equal(map_conventions.seg_index_from_image(palette_image), classes)
    assert torch.equal(map_conventions.seg_index_from_image(index_image), classes)
    black = torch.zeros(1, 3, 4, 3)
    assert map_conventions.seg_index_from_image(black).eq(0).all()
