"""Writes the shipped workflows: UI format in workflows/*.json (ComfyUI's template browser shows them) and the
API-format twin of each in workflows/api/*.json (what POST /prompt takes), plus workflows/api/manifest.json.

Both formats come from one graph description, so they cannot drift apart. Widget order and defaults are read from the
real node definitions, so the script needs a ComfyUI checkout (0.3.64 or later) to import:

    python workflows/build_workflows.py --comfyui /path/to/ComfyUI

The manifest lists, per workflow, the input images it loads (and where the test data holds them), the model files
it names, and the images it saves, so tests can set up a host and check the results.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEMO = "jodi-demo (built-in)"
AUTO = "auto (condition image, else width x height)"
ASPECT_CUSTOM = "width x height"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# ---------------------------------------------------------------------------------------------------------------------
# Node definitions from the running ComfyUI
# ---------------------------------------------------------------------------------------------------------------------


def load_definitions(comfy_dir: Path) -> dict:
    """class name -> (INPUT_TYPES dict, output types, output names) for core nodes and this pack's nodes."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.options  # noqa: F401  (must come before comfy.cli_args is parsed)
    from comfy.cli_args import args

    args.cpu = True
    import nodes as core_nodes

    # ComfyUI names a pack by its path; a dot in it (".cache", "0.3.75") would split the package name.
    name = str(comfy_dir.resolve() / "custom_nodes" / "ComfyUI-Jodi").replace(".", "_")
    spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[name] = pack
    spec.loader.exec_module(pack)
    ext = asyncio.run(pack.comfy_entrypoint())
    classes = dict(core_nodes.NODE_CLASS_MAPPINGS)
    try:  # "Preview as Text" (comfy_extras) shows the Janus captions
        from comfy_extras import nodes_preview_any

        classes.update(nodes_preview_any.NODE_CLASS_MAPPINGS)
    except ImportError:
        pass
    # "String (Multiline)" (comfy_extras, a V3 extension) holds a prompt that several nodes share
    from comfy_extras import nodes_primitive

    primitives = asyncio.run(asyncio.run(nodes_primitive.comfy_entrypoint()).get_node_list())
    classes.update({c.GET_SCHEMA().node_id: c for c in primitives})
    classes.update({c.GET_SCHEMA().node_id: c for c in asyncio.run(ext.get_node_list())})
    defs = {}
    for cname, cls in classes.items():
        try:
            it = cls.INPUT_TYPES()
        except Exception:  # some core nodes need optional packages; the workflows do not use them
            continue
        out_types = [str(t) for t in cls.RETURN_TYPES]
        out_names = list(getattr(cls, "RETURN_NAMES", None) or out_types)
        defs[cname] = (it, out_types, out_names)
    return defs


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, (list, tuple)) or str(kind) in WIDGET_TYPES


# ---------------------------------------------------------------------------------------------------------------------
# Graph description -> UI and API formats
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[int, int]
    values: dict
    title: str | None = None
    size: tuple[int, int] = (320, 260)

    def __getitem__(self, slot: int):
        return (self, slot)


@dataclass
class Graph:
    defs: dict
    nodes: list[Node] = field(default_factory=list)
    notes: list[tuple[tuple[int, int], str, tuple[int, int]]] = field(default_factory=list)

    def add(self, type_: str, pos, title=None, size=(320, 260), **values) -> Node:
        if type_ not in self.defs:
            raise KeyError(f"unknown node type {type_}")
        it = self.defs[type_][0]
        known = {**it.get("required", {}), **it.get("optional", {})}
        for k in values:
            if k not in known:
                raise KeyError(f"{type_} has no input {k!r}")
        node = Node(len(self.nodes) + 1, type_, tuple(pos), values, title, tuple(size))
        self.nodes.append(node)
        return node

    def note(self, pos, text: str, size=(420, 160)):
        self.notes.append((tuple(pos), text, tuple(size)))

    def _order(self, node: Node):
        it = self.defs[node.type][0]
        return [(name, it[sect][name]) for sect in ("required", "optional") for name in it.get(sect, {})]

    def api(self) -> dict:
        prompt = {}
        for node in self.nodes:
            inputs = {}
            for name, spec in self._order(node):
                value = node.values.get(name)
                if isinstance(value, tuple) and isinstance(value[0], Node):
                    inputs[name] = [str(value[0].id), value[1]]
                elif _is_widget(spec):
                    inputs[name] = value if value is not None else _default(spec)
            prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs,
                                    "_meta": {"title": node.title or node.type}}
        return prompt

    def ui(self) -> dict:
        links, ui_nodes = [], []
        out_links: dict[tuple[int, int], list[int]] = {}
        for node in self.nodes:
            for name, spec in self._order(node):
                value = node.values.get(name)
                if isinstance(value, tuple) and isinstance(value[0], Node):
                    src, slot = value
                    link_id = len(links) + 1
                    links.append([link_id, src.id, slot, node.id, None, self.defs[src.type][1][slot]])
                    out_links.setdefault((src.id, slot), []).append(link_id)
        for order, node in enumerate(self.nodes):
            it, out_types, out_names = self.defs[node.type]
            inputs, widgets = [], []
            for name, spec in self._order(node):
                value = node.values.get(name)
                linked = isinstance(value, tuple) and isinstance(value[0], Node)
                widget = _is_widget(spec)
                if widget:
                    # A widget fed by a link (e.g. a caption into a prompt) keeps its widgets_values slot.
                    widgets.append(_default(spec) if value is None or linked else value)
                    opts = spec[1] if len(spec) > 1 else {}
                    if opts.get("control_after_generate"):
                        widgets.append("fixed")
                    if opts.get("image_upload"):
                        widgets.append("image")
                    if not linked:
                        continue
                link_id = None
                if linked:
                    link = next(l for l in links if l[3] == node.id and l[4] is None and l[1] == value[0].id
                                and l[2] == value[1])
                    link[4] = len(inputs)
                    link_id = link[0]
                entry_in = {"name": name, "type": "COMBO" if isinstance(spec[0], (list, tuple)) else str(spec[0]),
                            "link": link_id}
                if widget:
                    entry_in["widget"] = {"name": name}
                inputs.append(entry_in)
            outputs = [{"name": out_names[i], "type": t, "links": out_links.get((node.id, i), []), "slot_index": i}
                       for i, t in enumerate(out_types)]
            properties = {"Node name for S&R": node.type}
            models = model_downloads(node)
            if models:  # what the front end's missing-models dialog offers to download
                properties["models"] = models
            entry = {
                "id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": properties, "widgets_values": widgets,
            }
            if node.title:
                entry["title"] = node.title
            ui_nodes.append(entry)
        for i, (pos, text, size) in enumerate(self.notes):
            ui_nodes.append({"id": len(self.nodes) + i + 1, "type": "Note", "pos": list(pos), "size": list(size),
                             "flags": {}, "order": len(self.nodes) + i, "mode": 0, "inputs": [], "outputs": [],
                             "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        return {
            "last_node_id": len(ui_nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [80, 120]}}, "version": 0.4,
        }


def _default(spec):
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, (list, tuple)):
        return kind[0] if kind else None
    if str(kind) == "COMBO":
        return opts.get("options", [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(str(kind))


# ---------------------------------------------------------------------------------------------------------------------
# Model downloads
# ---------------------------------------------------------------------------------------------------------------------

JODI_CKPT = "Jodi.pth"
DCAE_FILE = "dc-ae-f32c32-sana-1.0.safetensors"
GEMMA_FILE = "gemma-2-2b-it.safetensors"
JANUS_MODEL = "Janus-Pro-1B"
SD15_CKPT = "v1-5-pruned-emaonly.safetensors"
CN_DEPTH = "control_v11f1p_sd15_depth.pth"
CN_LINEART = "control_v11p_sd15_lineart.pth"
HF = "https://huggingface.co"


@dataclass(frozen=True)
class Download:
    """Where a model a workflow names comes from: ComfyUI model folder, source repository, file in the repository.

    ``name`` is the file name under ``directory`` when it is not the loader's value: a Janus model is a folder, and
    ComfyUI lists its weights as ``<folder>/<file>``.
    """

    directory: str
    repo: str
    file: str
    name: str | None = None

    @property
    def url(self) -> str:
        return f"{HF}/{self.repo}/resolve/main/{self.file}"


# The one table the loaders' properties.models come from; the README's Models table links the same URLs (a test
# checks both). The front end (1.49) offers a download for a missing model when its name ends in a model extension
# and the URL is on huggingface.co; it saves the file under the entry's name in models/<directory>.
MODEL_DOWNLOADS: dict[str, Download] = {
    JODI_CKPT: Download("diffusion_models", "VIPL-GENUN/Jodi", "Jodi.pth"),
    # The original-format DC-AE, saved under the name the workflows pick.
    DCAE_FILE: Download("vae", "mit-han-lab/dc-ae-f32c32-sana-1.0", "model.safetensors"),
    # No single-file Gemma-2-2B-IT is published: the link is the first weight shard of the official (gated) repository,
    # whose whole folder 'python -m jodi_core convert-gemma' turns into this one file.
    GEMMA_FILE: Download("text_encoders", "google/gemma-2-2b-it", "model-00001-of-00002.safetensors"),
    # A folder model: the dialog only lists widget values that end in a model extension, so it never shows this row;
    # the entry names the weights as ComfyUI lists them, and the note says which other files the folder needs.
    JANUS_MODEL: Download("Janus-Pro", "deepseek-ai/Janus-Pro-1B", "pytorch_model.bin",
                          name=f"{JANUS_MODEL}/pytorch_model.bin"),
    SD15_CKPT: Download("checkpoints", "stable-diffusion-v1-5/stable-diffusion-v1-5", SD15_CKPT),
    CN_DEPTH: Download("controlnet", "lllyasviel/ControlNet-v1-1", CN_DEPTH),
    CN_LINEART: Download("controlnet", "lllyasviel/ControlNet-v1-1", CN_LINEART),
}

# Loader node -> the input naming its model
LOADER_INPUTS = {
    "JodiModelLoader": "ckpt_name",
    "JodiVAELoader": "vae_name",
    "CLIPLoader": "clip_name",
    "JanusLoader": "model_name",
    "CheckpointLoaderSimple": "ckpt_name",
    "ControlNetLoader": "control_net_name",
}


def model_downloads(node: Node) -> list[dict]:
    """The ``properties.models`` entries of a loader node (the front end's format: name, url, directory)."""
    if node.type not in LOADER_INPUTS:
        return []
    value = node.values[LOADER_INPUTS[node.type]]
    if value == DEMO:  # built into the pack
        return []
    if value not in MODEL_DOWNLOADS:
        raise KeyError(f"{node.type} names {value!r}, which has no entry in MODEL_DOWNLOADS")
    d = MODEL_DOWNLOADS[value]
    return [{"name": d.name or value, "url": d.url, "directory": d.directory}]


# ---------------------------------------------------------------------------------------------------------------------
# The workflows
# ---------------------------------------------------------------------------------------------------------------------

MAPS = ("image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose")
LABELS = MAPS[1:]
PROMPT_NOTE = (
    "Prompts: add Load CLIP (type lumina2, a single-file gemma-2-2b-it made with 'python -m jodi_core "
    "convert-gemma') -> Jodi Text Encode, and connect it to 'positive'. Jodi needs Gemma-2-2B-IT, not the base "
    "Gemma-2-2B of Lumina Image 2.0. The built-in demo model takes no text."
)
MODEL_NOTE = (
    "Models: the built-in demo model runs on CPU in seconds. For the real model put Jodi.pth (or a .safetensors "
    "conversion) in models/diffusion_models or models/jodi and dc-ae-f32c32-sana-1.0 in models/vae, then pick them "
    "in the two loaders."
)


def _loaders(g: Graph, x=40, y=120):
    model = g.add("JodiModelLoader", (x, y), size=(320, 110), ckpt_name=DEMO, dtype="auto", attention="auto")
    vae = g.add("JodiVAELoader", (x, y + 150), size=(320, 90), vae_name=DEMO, dtype="auto")
    return model, vae


def _save_maps(g: Graph, src: Node, prefix: str, names=MAPS, x=1180, y=40, first_slot=0):
    saved = {}
    for i, name in enumerate(names):
        g.add("SaveImage", (x + (i % 4) * 270, y + (i // 4) * 330), size=(250, 300),
              images=src[first_slot + i], filename_prefix=f"{prefix}/{name}")
        saved[name] = f"{prefix}/{name}"
    return saved


def joint_generation(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    model, vae = _loaders(g)
    roles = g.add("JodiRoles", (40, 420), size=(320, 420))
    sampler = g.add("JodiSampler", (400, 120), size=(330, 420), model=model[0], vae=vae[0], roles=roles[0],
                    aspect="1:1", width=1024, height=1024, steps=20, cfg=4.5, seed=42, sampler="dpm++2m-flow",
                    flow_shift=3.0, batch_size=1)
    decode = g.add("JodiDecode", (770, 120), size=(330, 330), vae=vae[0], jodi_latent=sampler[0],
                   tiled_decode=False, mask_class="person")
    saved = _save_maps(g, decode, "jodi_joint")
    g.note((400, 580), "Joint generation: nothing connected to Jodi Roles, so every domain is generated together "
                       "(the image and its 7 label maps, consistent with each other). 'aspect' 1:1 picks the model's "
                       "native square size.\n\n" + PROMPT_NOTE + "\n\n" + MODEL_NOTE, size=(680, 220))
    return g, {"saves": saved, "size_hw": "bucket 1:1 of the model (demo: its base size; Jodi: 1024x1024)",
               "inputs": {}}


def controllable_generation(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    model, vae = _loaders(g)
    depth = g.add("LoadImage", (40, 420), size=(300, 330), title="depth condition", image="jodi_7-depth.jpg")
    lineart = g.add("LoadImage", (40, 800), size=(300, 330), title="lineart condition", image="jodi_7-lineart.jpg")
    gen = g.add("JodiControllableGeneration", (400, 120), size=(340, 620), model=model[0], vae=vae[0],
                depth=depth[0], lineart=lineart[0], unconnected_labels="ignore", aspect=AUTO, width=1024,
                height=1024, steps=20, cfg=4.5, seed=7, sampler="dpm++2m-flow", flow_shift=3.0, batch_size=1,
                tiled_decode=False, mask_class="person")
    g.add("SaveImage", (780, 120), size=(360, 520), images=gen[0], filename_prefix="jodi_controllable/image")
    g.note((780, 680), "Controllable generation: the image is generated from the connected label maps (here depth "
                       "and lineart of the same scene). Unconnected labels are left out (set 'unconnected_labels' to "
                       "generate to get them too). 'auto' size = the first condition's size.\n\n" + PROMPT_NOTE
                       + "\n\n" + MODEL_NOTE, size=(560, 260))
    inputs = {"jodi_7-depth.jpg": "jodi_test_images/7-depth.jpg",
              "jodi_7-lineart.jpg": "jodi_test_images/7-lineart.jpg"}
    return g, {"saves": {"image": "jodi_controllable/image"}, "size_hw": [1152, 768], "inputs": inputs}


def perception(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    model, vae = _loaders(g)
    photo = g.add("LoadImage", (40, 420), size=(300, 330), title="photo", image="jodi_pexels-jplenio-1105378.jpg")
    per = g.add("JodiPerception", (400, 120), size=(330, 520), model=model[0], vae=vae[0], image=photo[0],
                steps=20, seed=0, sampler="dpm++2m-flow", flow_shift=3.0, tiled_decode=False, mask_class="person")
    saved = _save_maps(g, per, "jodi_perception", names=LABELS, x=780)
    g.add("SaveImage", (780, 700), size=(250, 300), images=per[7], filename_prefix="jodi_perception/seg_classes")
    g.note((400, 730), "Perception: the photo is the condition, the 7 label maps are predicted in one pass at the "
                       "photo's size. No text encoder and no CFG are needed. Turn maps off to leave them out (faster)."
                       "\n\n" + MODEL_NOTE, size=(340, 300))
    saved["seg_classes"] = "jodi_perception/seg_classes"
    return g, {"saves": saved, "size_hw": [768, 1152],
               "inputs": {"jodi_pexels-jplenio-1105378.jpg": "jodi_test_images/pexels-jplenio-1105378.jpg"}}


def controlnet_chain(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    model, vae = _loaders(g)
    photo = g.add("LoadImage", (40, 420), size=(300, 330), title="photo", image="jodi_pexels-jplenio-1105378.jpg")
    per = g.add("JodiPerception", (400, 120), size=(330, 520), model=model[0], vae=vae[0], image=photo[0],
                lineart=True, edge=False, depth=True, normal=False, albedo=False, segmentation=False,
                openpose=False, steps=20, seed=0, sampler="dpm++2m-flow", flow_shift=3.0, tiled_decode=False,
                mask_class="person")
    hint = g.add("JodiDepthToControlNet", (770, 120), size=(280, 110), depth=per[2], invert=False, normalize=True)
    ckpt = g.add("CheckpointLoaderSimple", (770, 280), size=(320, 100), ckpt_name=SD15_CKPT)
    pos = g.add("CLIPTextEncode", (1120, 280), size=(360, 140), clip=ckpt[1],
                text="an oil painting of a woman walking along railway tracks through an autumn forest, "
                     "highly detailed")
    neg = g.add("CLIPTextEncode", (1120, 460), size=(360, 120), clip=ckpt[1], text="blurry, low quality")
    cn_depth = g.add("ControlNetLoader", (770, 430), size=(320, 60),
                     control_net_name=CN_DEPTH)
    cn_line = g.add("ControlNetLoader", (770, 530), size=(320, 60),
                    control_net_name=CN_LINEART)
    apply_depth = g.add("ControlNetApplyAdvanced", (1520, 120), size=(300, 190), positive=pos[0], negative=neg[0],
                        control_net=cn_depth[0], image=hint[0], strength=0.8, start_percent=0.0, end_percent=1.0)
    # Jodi lineart is dark lines on white; ControlNet lineart models take white lines on black.
    line_hint = g.add("ImageInvert", (1120, 760), size=(200, 50), image=per[0])
    apply_line = g.add("ControlNetApplyAdvanced", (1520, 360), size=(300, 190), positive=apply_depth[0],
                       negative=apply_depth[1], control_net=cn_line[0], image=line_hint[0], strength=0.6,
                       start_percent=0.0, end_percent=0.8)
    latent = g.add("EmptyLatentImage", (1120, 620), size=(300, 110), width=768, height=512, batch_size=1)
    ks = g.add("KSampler", (1860, 120), size=(320, 470), model=ckpt[0], seed=1, steps=20, cfg=7.0,
               sampler_name="euler", scheduler="normal", positive=apply_line[0], negative=apply_line[1],
               latent_image=latent[0], denoise=1.0)
    dec = g.add("VAEDecode", (2220, 120), size=(200, 50), samples=ks[0], vae=ckpt[2])
    g.add("SaveImage", (2220, 220), size=(380, 320), images=dec[0], filename_prefix="jodi_controlnet/image")
    g.add("SaveImage", (770, 650), size=(250, 300), images=hint[0], filename_prefix="jodi_controlnet/depth_hint")
    g.note((400, 730), "ControlNet chain: Jodi predicts depth and lineart from the photo; the depth map is put in "
                       "the ControlNet convention (near = bright), the lineart is inverted (ControlNet wants white "
                       "lines on black) and both guide an SD 1.5 checkpoint through core Apply ControlNet nodes. "
                       "Put the SD 1.5 checkpoint in models/checkpoints and the two "
                       "ControlNet 1.1 files (depth, lineart) in models/controlnet, or pick your own.\n\n"
                       + MODEL_NOTE, size=(340, 330))
    return g, {"saves": {"image": "jodi_controlnet/image", "depth_hint": "jodi_controlnet/depth_hint"},
               "size_hw": {"image": [512, 768], "depth_hint": [768, 1152]},
               "inputs": {"jodi_pexels-jplenio-1105378.jpg": "jodi_test_images/pexels-jplenio-1105378.jpg"},
               "models": {"checkpoints": [SD15_CKPT], "controlnet": [CN_DEPTH, CN_LINEART]}}


REAL_JODI_NOTE = (
    "Jodi needs the real model here (the built-in demo model takes no text): Jodi.pth in models/diffusion_models or "
    "models/jodi, dc-ae-f32c32-sana-1.0 in models/vae, and a single-file gemma-2-2b-it in models/text_encoders "
    "('python -m jodi_core convert-gemma')."
)
JANUS_NOTE = (
    "Janus: download deepseek-ai/Janus-Pro-1B (or -7B) and put the whole folder (weights, config.json, "
    "tokenizer.json, preprocessor_config.json) in models/Janus-Pro, e.g. models/Janus-Pro/Janus-Pro-1B; then pick "
    "it in Janus Loader. It runs in plain PyTorch (no 'janus' package needed), on CPU too."
)


def janus_caption_to_jodi(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    photo = g.add("LoadImage", (40, 120), size=(300, 330), title="photo", image="jodi_pexels-jplenio-1105378.jpg")
    janus = g.add("JanusLoader", (40, 500), size=(320, 90), model_name=JANUS_MODEL, dtype="auto")
    caption = g.add("JanusCaption", (400, 120), size=(320, 130), model=janus[0], image=photo[0],
                    detail="for a Jodi prompt", max_new_tokens=256)
    g.add("PreviewAny", (400, 290), size=(320, 200), title="caption", source=caption[0])
    clip = g.add("CLIPLoader", (400, 530), size=(320, 110), clip_name=GEMMA_FILE, type="lumina2", device="default")
    encode = g.add("JodiTextEncode", (760, 720), size=(320, 160), clip=clip[0], text=caption[0],
                   complex_human_instruction=True)
    model = g.add("JodiModelLoader", (40, 640), size=(320, 110), ckpt_name=JODI_CKPT, dtype="auto",
                  attention="auto")
    vae = g.add("JodiVAELoader", (40, 790), size=(320, 90), vae_name=DCAE_FILE, dtype="auto")
    per = g.add("JodiPerception", (760, 120), size=(330, 360), model=model[0], vae=vae[0], image=photo[0],
                lineart=True, edge=False, depth=True, normal=False, albedo=False, segmentation=False,
                openpose=False, steps=20, seed=0, sampler="dpm++2m-flow", flow_shift=3.0, tiled_decode=False,
                mask_class="person")
    gen = g.add("JodiControllableGeneration", (1130, 120), size=(340, 620), model=model[0], vae=vae[0],
                depth=per[2], lineart=per[0], positive=encode[0], unconnected_labels="ignore", aspect=AUTO,
                width=1024, height=1024, steps=20, cfg=4.5, seed=7, sampler="dpm++2m-flow", flow_shift=3.0,
                batch_size=1, tiled_decode=False, mask_class="person")
    g.add("SaveImage", (1510, 120), size=(360, 520), images=gen[0], filename_prefix="janus_caption_to_jodi/image")
    g.add("SaveImage", (1510, 680), size=(250, 300), images=per[2], filename_prefix="janus_caption_to_jodi/depth")
    g.add("SaveImage", (1780, 680), size=(250, 300), images=per[0], filename_prefix="janus_caption_to_jodi/lineart")
    g.note((1130, 780), "Photo -> Janus caption -> Jodi. Janus describes the photo ('for a Jodi prompt': one "
                       "paragraph), Jodi Text Encode turns the caption into Jodi's prompt (the caption is linked "
                       "into its text input), Jodi Perception reads the photo's depth and lineart, and Jodi "
                       "Controllable Generation draws a new image from those maps and the caption. Change the seed "
                       "for variations; edit the text in between with a String node if you like.\n\n"
                       + JANUS_NOTE + "\n\n" + REAL_JODI_NOTE, size=(360, 340))
    saves = {name: f"janus_caption_to_jodi/{name}" for name in ("image", "depth", "lineart")}
    return g, {"saves": saves, "size_hw": [768, 1152],
               "inputs": {"jodi_pexels-jplenio-1105378.jpg": "jodi_test_images/pexels-jplenio-1105378.jpg"}}


def janus_text_to_image(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    janus = g.add("JanusLoader", (40, 120), size=(320, 90), model_name=JANUS_MODEL, dtype="auto")
    gen = g.add("JanusGenerate", (400, 120), size=(340, 330), model=janus[0],
                prompt="A close-up portrait of a red fox in a snowy forest, soft morning light, film grain, best "
                       "quality.", cfg=5.0, temperature=1.0, seed=42, batch_size=1)
    g.add("SaveImage", (780, 120), size=(400, 440), images=gen[0], filename_prefix="janus_generate/image")
    g.note((40, 260), "Janus text-to-image: Janus writes the picture as 576 image tokens with classifier-free "
                      "guidance (cfg 5 as in the reference) and decodes them to 384x384. batch_size makes several "
                      "images at once.\n\n" + JANUS_NOTE, size=(320, 300))
    return g, {"saves": {"image": "janus_generate/image"},
               "size_hw": "the Janus model's image size (384x384 for Janus and Janus-Pro)", "inputs": {}}


JANUS_DRAFT_PROMPT = (
    "A cozy reading corner by a tall window, a green velvet armchair, a stack of old books and a sleeping tabby cat, "
    "warm afternoon light, detailed, best quality."
)


def janus_draft_to_jodi_1024(defs) -> tuple[Graph, dict]:
    g = Graph(defs)
    prompt = g.add("PrimitiveStringMultiline", (40, 120), size=(320, 170), title="prompt", value=JANUS_DRAFT_PROMPT)
    janus = g.add("JanusLoader", (40, 330), size=(320, 90), model_name=JANUS_MODEL, dtype="auto")
    model = g.add("JodiModelLoader", (40, 460), size=(320, 110), ckpt_name=JODI_CKPT, dtype="auto",
                  attention="auto")
    vae = g.add("JodiVAELoader", (40, 610), size=(320, 110), vae_name=DCAE_FILE, dtype="auto")
    clip = g.add("CLIPLoader", (40, 760), size=(320, 110), clip_name=GEMMA_FILE, type="lumina2", device="default")
    draft = g.add("JanusGenerate", (400, 120), size=(320, 250), title="Janus Generate (384 px draft)",
                  model=janus[0], prompt=prompt[0], cfg=5.0, temperature=1.0, seed=42, batch_size=1)
    encode = g.add("JodiTextEncode", (400, 760), size=(320, 110), clip=clip[0], text=prompt[0],
                   complex_human_instruction=True)
    per = g.add("JodiPerception", (760, 120), size=(330, 360), model=model[0], vae=vae[0], image=draft[0],
                lineart=True, edge=False, depth=True, normal=False, albedo=False, segmentation=False,
                openpose=False, steps=20, seed=0, sampler="dpm++2m-flow", flow_shift=3.0, tiled_decode=False,
                mask_class="person")
    gen = g.add("JodiControllableGeneration", (1130, 120), size=(340, 620), title="Jodi at 1024 px",
                model=model[0], vae=vae[0], depth=per[2], lineart=per[0], positive=encode[0],
                unconnected_labels="ignore", aspect=ASPECT_CUSTOM, width=1024, height=1024, steps=20, cfg=4.5,
                seed=7, sampler="dpm++2m-flow", flow_shift=3.0, batch_size=1, tiled_decode=False,
                mask_class="person")
    g.add("SaveImage", (1510, 120), size=(420, 470), images=gen[0], filename_prefix="janus_draft_to_jodi/image")
    g.add("SaveImage", (400, 410), size=(320, 310), images=draft[0], filename_prefix="janus_draft_to_jodi/draft")
    g.add("SaveImage", (760, 790), size=(250, 280), images=per[2], filename_prefix="janus_draft_to_jodi/depth")
    g.add("SaveImage", (1030, 790), size=(250, 280), images=per[0], filename_prefix="janus_draft_to_jodi/lineart")
    g.note((1510, 640), "Janus draft -> Jodi at 1024 px. Janus tops out at 384x384; here its picture is only a "
                        "draft. Jodi Perception reads the draft's depth and lineart, and Jodi Controllable "
                        "Generation draws the final image at 1024x1024 from those maps and the same prompt (the "
                        "'prompt' node feeds both Janus Generate and Jodi Text Encode). Change the Janus seed for "
                        "another composition, the Jodi seed for another rendering of it.\n\n" + JANUS_NOTE
                        + "\n\n" + REAL_JODI_NOTE, size=(420, 260))
    saves = {name: f"janus_draft_to_jodi/{name}" for name in ("image", "draft", "depth", "lineart")}
    janus_size = "the Janus model's image size (384x384 for Janus and Janus-Pro)"
    return g, {"saves": saves, "size_hw": {"image": [1024, 1024], "draft": janus_size, "depth": janus_size,
                                           "lineart": janus_size}, "inputs": {}}


WORKFLOWS = {
    "jodi_joint_generation": joint_generation,
    "jodi_controllable_generation": controllable_generation,
    "jodi_perception": perception,
    "jodi_controlnet_chain": controlnet_chain,
    "janus_caption_to_jodi": janus_caption_to_jodi,
    "janus_text_to_image": janus_text_to_image,
    "janus_draft_to_jodi_1024": janus_draft_to_jodi_1024,
}

# Loader node -> (manifest model folder key, the input naming the model)
MODEL_INPUTS = {
    "JodiModelLoader": ("diffusion_models|jodi", "ckpt_name"),
    "JodiVAELoader": ("vae", "vae_name"),
    "CLIPLoader": ("text_encoders", "clip_name"),
    "JanusLoader": ("Janus-Pro", "model_name"),
}


def named_models(graph: Graph) -> dict[str, list[str]]:
    """Model files/folders the graph's Jodi, Janus and text-encoder loaders name, by model folder."""
    models: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.type in MODEL_INPUTS:
            folder, key = MODEL_INPUTS[node.type]
            names = models.setdefault(folder, [])
            if node.values[key] not in names:
                names.append(node.values[key])
    return models


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="ComfyUI folder (the one holding main.py)")
    parser.add_argument("--out", type=Path, default=HERE)
    ns = parser.parse_args(argv)
    defs = load_definitions(ns.comfyui.resolve())
    (ns.out / "api").mkdir(parents=True, exist_ok=True)
    manifest = {}
    for name, build in WORKFLOWS.items():
        graph, info = build(defs)
        (ns.out / f"{name}.json").write_text(json.dumps(graph.ui(), indent=1) + "\n")
        (ns.out / "api" / f"{name}.json").write_text(json.dumps(graph.api(), indent=1) + "\n")
        models = {**named_models(graph), **info.pop("models", {})}
        manifest[name] = {"ui": f"workflows/{name}.json", "api": f"workflows/api/{name}.json", "models": models,
                          "input_source_dir": "shared/data (the repository's test data)", **info}
    (ns.out / "api" / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
