"""Jodi Sampler, Jodi Decode and the one-node shortcuts (joint generation, controllable generation, perception)."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..jodi_core import imaging
from ..jodi_core.domains import (
    DOMAIN_NAMES, LABEL_NAMES, SEG12_CLASSES, controllable_roles, joint_roles, perception_roles,
)
from . import common, payloads, run, vocabulary

# ---------------------------------------------------------------------------------------------------------------------
# Shared input/output declarations
# ---------------------------------------------------------------------------------------------------------------------


def _model_inputs():
    return [
        common.JodiModel.Input("model", tooltip="The Jodi DiT from Load Jodi Model."),
        common.JodiVAE.Input("vae", tooltip="The DC-AE from Load Jodi DC-AE (encodes conditions, decodes maps)."),
    ]


def _prompt_inputs():
    return [
        io.Conditioning.Input(
            "positive", optional=True,
            tooltip="Prompt from Jodi Text Encode. Leave unconnected to run without text (the model's stored empty "
                    "caption; no text encoder needed, e.g. for perception)."),
        io.Conditioning.Input(
            "negative", optional=True,
            tooltip="Negative prompt from Jodi Text Encode (instruction prefix off). Unconnected: the empty caption "
                    "\"\" through the same Gemma, as the reference does (Jodi Text Encode attaches it to the "
                    "positive). Used only with a positive prompt and cfg != 1."),
    ]


def _size_inputs(default_aspect: str = vocabulary.ASPECT_AUTO):
    presets = ", ".join(imaging.ASPECT_PRESETS)
    return [
        io.Combo.Input(
            "aspect", options=list(vocabulary.ASPECT_CHOICES), default=default_aspect,
            tooltip="Output size. auto: the first connected condition image's size, else width x height. width x "
                    "height: as given. A preset (W:H, one of " + presets + "): the official bucket size for that "
                    "aspect (16:9 and 9:16 give the nearest buckets, 2:1 and 1:2). Jodi always samples at the nearest "
                    "official aspect bucket and resizes the maps back. The maps are kept at the output size: a run "
                    "whose maps cannot fit in the free memory is refused before it starts."),
        io.Int.Input("width", default=1024, min=32, max=8192, step=8,
                     tooltip="Output width in pixels (used by 'width x height' and by 'auto' without conditions)."),
        io.Int.Input("height", default=1024, min=32, max=8192, step=8,
                     tooltip="Output height in pixels (used by 'width x height' and by 'auto' without conditions)."),
    ]


def _sampling_inputs(cfg: bool = True, batch: bool = True):
    inputs = [
        io.Int.Input("steps", default=20, min=1, max=run.MAX_STEPS,
                     tooltip="Sampling steps (the reference uses 20)."),
    ]
    if cfg:
        inputs.append(io.Float.Input(
            "cfg", default=4.5, min=0.0, max=run.MAX_CFG, step=0.1, round=0.01,
            tooltip="Classifier-free guidance scale (reference 4.5). 1 or no prompt: a single pass per step."))
    inputs += [
        io.Int.Input("seed", default=0, min=0, max=vocabulary.MAX_SEED, control_after_generate=True,
                     tooltip="Noise seed. Sample i of a batch uses seed + i (wrapping at 2^64); the noise is drawn "
                             "on the CPU, so a seed gives the same result on any device."),
        io.Combo.Input("sampler", options=list(vocabulary.SAMPLERS), default="dpm++2m-flow",
                       tooltip="dpm++2m-flow: the reference's DPM-Solver++ (2M) for flow matching. euler-flow: "
                               "first-order Euler steps on the velocity."),
        io.Float.Input("flow_shift", default=3.0, min=0.01, max=100.0, step=0.1, round=0.01,
                       tooltip="Time-shift of the flow schedule (reference 3.0); higher spends more steps at high "
                               "noise."),
    ]
    if batch:
        inputs.append(io.Int.Input(
            "batch_size", default=1, min=1, max=run.MAX_BATCH,
            tooltip="Images per run. With a batch of condition images, 1 means one result per condition image."))
    return inputs


def _fit_input():
    return io.Combo.Input(
        "condition_fit", options=list(imaging.CONDITION_FITS), default=imaging.ALIGNED_FIT, optional=True,
        tooltip="How condition images are brought to the sampling size (the nearest official aspect bucket). "
                "stretch: resized to it, so the maps and the image line up with the inputs pixel for pixel (the "
                "model sees the input slightly squeezed when its aspect ratio is not a bucket's). crop: covered and "
                "centre-cropped as the reference app does; its outputs, resized back, are then shifted near the "
                "borders for such inputs.")


def _decode_inputs():
    return [
        io.Boolean.Input("tiled_decode", default=False,
                         tooltip="Decode in tiles from the start: slower, less memory. Without it a decode that does not fit in "
                                 "free memory goes to tiles by itself (said in the log)."),
        io.Combo.Input("mask_class", options=list(SEG12_CLASSES), default="person",
                       tooltip="Segmentation class whose pixels form the seg_mask output."),
    ]


def _map_outputs(domains=DOMAIN_NAMES):
    outs = [io.Image.Output(display_name=name, tooltip=f"{name}: {common.DOMAIN_TOOLTIPS[name]} (IMAGE, 0..1). "
                            "Black if the run did not produce it.") for name in domains]
    outs += [
        io.Image.Output(display_name="seg_classes",
                        tooltip="Segmentation as an index image: grey value = class id / 255 (12 classes: "
                                + ", ".join(f"{i} {n}" for i, n in enumerate(SEG12_CLASSES)) + ")."),
        io.Mask.Output(display_name="seg_mask", tooltip="MASK of the class chosen in mask_class."),
    ]
    return outs


def _settings(kwargs) -> run.RunSettings:
    fields = run.RunSettings.__dataclass_fields__
    return run.RunSettings(**{k: v for k, v in kwargs.items() if k in fields})


# ---------------------------------------------------------------------------------------------------------------------
# Sampler and decoder
# ---------------------------------------------------------------------------------------------------------------------


class JodiSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiSampler",
            display_name="Jodi Sampler",
            category="Jodi/sampling",
            description=(
                "Samples all non-ignored Jodi domains jointly with the roles from Jodi Roles / Conditions, and "
                "outputs the multi-domain latent for Jodi Decode. Shows a progress bar (and a live preview of the "
                "image when ComfyUI's previews are on) and stops on Cancel."
            ),
            inputs=[*_model_inputs(), common.JodiRolesType.Input("roles", tooltip="From Jodi Roles / Conditions."),
                    *_prompt_inputs(), *_size_inputs(), *_sampling_inputs(), _fit_input()],
            outputs=[common.JodiLatentType.Output(
                display_name="jodi_latent",
                tooltip="Latents of all 8 domains with their roles and the output size, for Jodi Decode.")],
        )

    @classmethod
    def validate_inputs(cls, aspect=None, sampler=None, condition_fit=None):
        return run.check_combo_inputs(aspect=aspect, sampler=sampler, condition_fit=condition_fit)

    @classmethod
    def execute(cls, model, vae, roles, positive=None, negative=None, **kwargs) -> io.NodeOutput:
        latent, _ = run.sample(model, vae, roles, _settings(kwargs), positive, negative, decode=False)
        return io.NodeOutput(latent)


class JodiDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiDecode",
            display_name="Jodi Decode",
            category="Jodi/sampling",
            description=(
                "Decodes a Jodi latent into 8 IMAGE maps at the requested size, each post-processed as the reference "
                "does (depth normalised, normals unit length, segmentation snapped to the 12-colour palette), plus "
                "the segmentation as a class-index image and a class MASK."
            ),
            inputs=[common.JodiVAE.Input("vae", tooltip="The DC-AE from Load Jodi DC-AE."),
                    common.JodiLatentType.Input("jodi_latent", tooltip="From Jodi Sampler or Jodi Latent Merge."),
                    *_decode_inputs()],
            outputs=_map_outputs(),
        )

    @classmethod
    def validate_inputs(cls, mask_class=None):
        return run.check_combo_inputs(mask_class=mask_class)

    @classmethod
    def execute(cls, vae, jodi_latent, tiled_decode=False, mask_class="person") -> io.NodeOutput:
        vocabulary.check_choice("mask_class", mask_class, SEG12_CLASSES)
        images, seg = run.decode(vae, jodi_latent, tiled=bool(tiled_decode))
        return io.NodeOutput(*run.map_outputs(images, seg, jodi_latent.batch, jodi_latent.height, jodi_latent.width,
                                              mask_class))


# ---------------------------------------------------------------------------------------------------------------------
# One-node shortcuts
# ---------------------------------------------------------------------------------------------------------------------


def _sample_and_maps(model, vae, roles, kwargs, positive=None, negative=None, domains=DOMAIN_NAMES):
    tiled = bool(kwargs.pop("tiled_decode", False))
    mask_class = kwargs.pop("mask_class", "person")
    vocabulary.check_choice("mask_class", mask_class, SEG12_CLASSES)
    latent, result = run.sample(model, vae, roles, _settings(kwargs), positive, negative, decode=True, tiled=tiled)
    return run.map_outputs(result.images, result.seg_index, latent.batch, latent.height, latent.width, mask_class,
                           domains)


class JodiJointGeneration(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiJointGeneration",
            display_name="Jodi Joint Generation",
            category="Jodi/jobs",
            description=(
                "One node for joint generation: an image and its 7 label maps (lineart, edge, depth, normal, albedo, "
                "segmentation, openpose) generated together from a prompt, or from nothing."
            ),
            inputs=[*_model_inputs(), *_prompt_inputs(), *_size_inputs(vocabulary.ASPECT_CUSTOM),
                    *_sampling_inputs(), *_decode_inputs()],
            outputs=_map_outputs(),
        )

    @classmethod
    def validate_inputs(cls, aspect=None, sampler=None, mask_class=None):
        return run.check_combo_inputs(aspect=aspect, sampler=sampler, mask_class=mask_class)

    @classmethod
    def execute(cls, model, vae, positive=None, negative=None, **kwargs) -> io.NodeOutput:
        roles = payloads.RolesPayload(joint_roles())
        return io.NodeOutput(*_sample_and_maps(model, vae, roles, kwargs, positive, negative))


class JodiControllableGeneration(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        label_inputs = [io.Image.Input(name, optional=True,
                                       tooltip=f"Optional {name} condition ({common.DOMAIN_TOOLTIPS[name]}).")
                        for name in LABEL_NAMES]
        return io.Schema(
            node_id="JodiControllableGeneration",
            display_name="Jodi Controllable Generation",
            category="Jodi/jobs",
            description=(
                "One node for controllable generation: an image generated from any set of connected label maps "
                "(lineart, edge, depth, normal, albedo, segmentation, openpose) and an optional prompt."
            ),
            inputs=[*_model_inputs(), *label_inputs, *_prompt_inputs(),
                    io.Combo.Input("unconnected_labels", options=["ignore", "generate"], default="ignore",
                                   tooltip="What happens to label maps that are not connected. ignore: left out "
                                           "(faster). generate: made along with the image."),
                    *_size_inputs(), *_sampling_inputs(), *_decode_inputs(), _fit_input()],
            outputs=_map_outputs(),
        )

    @classmethod
    def validate_inputs(cls, aspect=None, sampler=None, mask_class=None, unconnected_labels=None,
                        condition_fit=None):
        return run.check_combo_inputs(aspect=aspect, sampler=sampler, mask_class=mask_class,
                                      unconnected_labels=unconnected_labels, condition_fit=condition_fit)

    @classmethod
    def execute(cls, model, vae, positive=None, negative=None, unconnected_labels="ignore",
                **kwargs) -> io.NodeOutput:
        vocabulary.check_choice("unconnected_labels", unconnected_labels, ("ignore", "generate"))
        images = {name: kwargs.pop(name, None) for name in LABEL_NAMES}
        if all(img is None for img in images.values()):
            raise ValueError("Jodi Controllable Generation needs at least one connected label map; use Jodi Joint "
                             "Generation to generate without conditions.")
        given = {name: img for name, img in images.items() if img is not None}
        roles = payloads.RolesPayload(controllable_roles(list(given), unconnected_labels), given)
        return io.NodeOutput(*_sample_and_maps(model, vae, roles, kwargs, positive, negative))


class JodiPerception(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        toggles = [io.Boolean.Input(name, default=True,
                                    tooltip=f"Predict the {name} map. Off: the domain is left out of the run, "
                                            "which makes it faster.")
                   for name in LABEL_NAMES]
        return io.Schema(
            node_id="JodiPerception",
            display_name="Jodi Perception",
            category="Jodi/jobs",
            description=(
                "One node for perception: predicts the 7 label maps (lineart, edge, depth, normal, albedo, "
                "segmentation, openpose) of an image in one pass, at the image's size. No text encoder and no CFG "
                "are needed (the reference drops the caption for perception)."
            ),
            inputs=[*_model_inputs(),
                    io.Image.Input("image", tooltip="Image (or batch of images) to analyse."),
                    *toggles, *_sampling_inputs(cfg=False, batch=False), *_decode_inputs(), _fit_input()],
            outputs=_map_outputs(LABEL_NAMES),
        )

    @classmethod
    def validate_inputs(cls, sampler=None, mask_class=None, condition_fit=None):
        return run.check_combo_inputs(sampler=sampler, mask_class=mask_class, condition_fit=condition_fit)

    @classmethod
    def execute(cls, model, vae, image, **kwargs) -> io.NodeOutput:
        wanted = {name: bool(kwargs.pop(name, True)) for name in LABEL_NAMES}
        if not any(wanted.values()):
            raise ValueError("Jodi Perception: turn on at least one label map.")
        roles = payloads.RolesPayload(perception_roles([n for n in LABEL_NAMES if wanted[n]]), {"image": image})
        kwargs.update(aspect=vocabulary.ASPECT_AUTO, cfg=1.0)
        return io.NodeOutput(*_sample_and_maps(model, vae, roles, kwargs, domains=LABEL_NAMES))


NODES = [JodiSampler, JodiDecode, JodiJointGeneration, JodiControllableGeneration, JodiPerception]
