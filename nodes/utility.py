"""Utility nodes: map conventions for other tools (ControlNets, ADE20K models) and Jodi-latent split/merge."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..jodi_core.domains import DOMAIN_NAMES, SEG12_CLASSES
from . import common, layouts, map_conventions, payloads, vocabulary

log = logging.getLogger(__name__)


class JodiDepthToControlNet(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiDepthToControlNet",
            display_name="Jodi Depth to ControlNet",
            category="Jodi/utils",
            description=(
                "Turns a depth map into the ControlNet depth convention: grey, near = bright, far = dark, stretched "
                "to the full 0..1 range per image (Jodi's depth is already near-bright)."
            ),
            inputs=[
                io.Image.Input("depth", tooltip="Depth IMAGE, e.g. the depth output of Jodi Perception."),
                io.Boolean.Input("invert", default=False,
                                 tooltip="Flip to near = dark, for tools that expect metric-style depth images."),
                io.Boolean.Input("normalize", default=True,
                                 tooltip="Stretch each map to the full 0..1 range (min -> 0, max -> 1)."),
            ],
            outputs=[io.Image.Output(display_name="depth", tooltip="Grey depth hint for ControlNet (IMAGE).")],
        )

    @classmethod
    def execute(cls, depth, invert=False, normalize=True) -> io.NodeOutput:
        return io.NodeOutput(map_conventions.depth_for_controlnet(depth, bool(invert), bool(normalize)))


class JodiNormalConvention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiNormalConvention",
            display_name="Jodi Normal Convention",
            category="Jodi/utils",
            description=(
                "Mirrors axes of a normal map (a channel c becomes 1 - c) to match another tool's convention. Jodi's "
                "normals are red = left, green = up, blue = towards the viewer, as the normal-BAE/DSINE "
                "preprocessors draw them: control_v11p_sd15_normalbae takes them with no flips. OpenGL-style maps "
                "(red = right, green = up): flip red. DirectX-style (red = right, green = down): flip red and green."
            ),
            inputs=[
                io.Image.Input("normal", tooltip="Normal map IMAGE (RGB = XYZ mapped to 0..1)."),
                io.Boolean.Input("flip_red", default=False, tooltip="Mirror the X axis (left <-> right)."),
                io.Boolean.Input("flip_green", default=False,
                                 tooltip="Mirror the Y axis (up <-> down; OpenGL <-> DirectX)."),
                io.Boolean.Input("flip_blue", default=False, tooltip="Mirror the Z axis (towards <-> away from "
                                                                     "the camera)."),
            ],
            outputs=[io.Image.Output(display_name="normal", tooltip="The converted normal map (IMAGE).")],
        )

    @classmethod
    def execute(cls, normal, flip_red=False, flip_green=False, flip_blue=False) -> io.NodeOutput:
        return io.NodeOutput(map_conventions.flip_normal(normal, bool(flip_red), bool(flip_green), bool(flip_blue)))


class JodiSegToADE20K(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiSegToADE20K",
            display_name="Jodi Segmentation to ADE20K",
            category="Jodi/utils",
            description=(
                "Recolours a Jodi 12-class segmentation into the ADE20K-150 palette used by segmentation "
                "ControlNets. Each Jodi class becomes one ADE20K class (person -> person, plant -> plant, vehicle -> "
                "car, furniture -> chair, wall -> wall (floors and ceilings too), ...); 'unlabeled' becomes black."
            ),
            inputs=[io.Image.Input(
                "segmentation", tooltip="Segmentation IMAGE in Jodi's 12-colour palette (nearest colour is used).")],
            outputs=[
                io.Image.Output(display_name="ade20k", tooltip="The map in ADE20K-150 colours (IMAGE)."),
                io.Image.Output(display_name="ade20k_index",
                                tooltip="ADE20K class ids as an index image: grey value = id / 255 (0 = unlabeled)."),
            ],
        )

    @classmethod
    def execute(cls, segmentation) -> io.NodeOutput:
        colours, index = map_conventions.seg_to_ade150(segmentation)
        return io.NodeOutput(colours, layouts.index_to_index_image(index))


class JodiSegClassMask(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiSegClassMask",
            display_name="Jodi Segmentation Class Mask",
            category="Jodi/utils",
            description="MASK of one class of a Jodi 12-colour segmentation map (e.g. every person or the sky).",
            inputs=[
                io.Image.Input("segmentation", tooltip="Segmentation IMAGE in Jodi's 12-colour palette."),
                io.Combo.Input("class_name", options=list(SEG12_CLASSES), default="person",
                               tooltip="The class whose pixels become 1 in the mask."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="1 where the class is, 0 elsewhere.")],
        )

    @classmethod
    def validate_inputs(cls, class_name=None):
        return vocabulary.validation([lambda: class_name is None or vocabulary.check_choice("class_name", class_name,
                                                                                            SEG12_CLASSES)])

    @classmethod
    def execute(cls, segmentation, class_name="person") -> io.NodeOutput:
        vocabulary.check_choice("class_name", class_name, SEG12_CLASSES)
        index = map_conventions.seg_index_from_image(segmentation)
        return io.NodeOutput(layouts.class_mask(index, SEG12_CLASSES.index(class_name)))


_DOMAIN_TIP = "Domain: " + ", ".join(DOMAIN_NAMES) + "."


class JodiLatentSplit(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiLatentSplit",
            display_name="Jodi Latent Split",
            category="Jodi/latent",
            description=(
                "Takes one domain out of a Jodi latent as a standard LATENT (the DC-AE's latent channels, 32 for "
                "the released one; scaled), e.g. to save it or to put it into another Jodi latent with Jodi Latent "
                "Merge."
            ),
            inputs=[
                common.JodiLatentType.Input("jodi_latent", tooltip="From Jodi Sampler."),
                io.Combo.Input("domain", options=list(DOMAIN_NAMES), default="image", tooltip=_DOMAIN_TIP),
            ],
            outputs=[io.Latent.Output(
                display_name="latent",
                tooltip="That domain's latent {'samples': (B, C, h, w)} (DC-AE space, not SD's).")],
        )

    @classmethod
    def validate_inputs(cls, domain=None):
        return vocabulary.validation([lambda: domain is None or vocabulary.check_choice("domain", domain, DOMAIN_NAMES)])

    @classmethod
    def execute(cls, jodi_latent, domain="image") -> io.NodeOutput:
        vocabulary.check_choice("domain", domain, DOMAIN_NAMES)
        if not isinstance(jodi_latent, payloads.LatentPayload):
            raise TypeError(f"jodi_latent must come from Jodi Sampler, got {type(jodi_latent).__name__}.")
        return io.NodeOutput({"samples": jodi_latent.select(domain).clone(), "jodi_domain": domain})


class JodiLatentMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="JodiLatentMerge",
            display_name="Jodi Latent Merge",
            category="Jodi/latent",
            description=(
                "Puts a single-domain LATENT (from Jodi Latent Split) into a Jodi latent, replacing that domain; the "
                "domain then counts as present for Jodi Decode."
            ),
            inputs=[
                common.JodiLatentType.Input("jodi_latent", tooltip="The Jodi latent to change (it is not modified)."),
                io.Latent.Input("latent", tooltip="A DC-AE latent of the same size, e.g. from Jodi Latent Split."),
                io.Combo.Input("domain", options=list(DOMAIN_NAMES), default="image", tooltip=_DOMAIN_TIP),
            ],
            outputs=[common.JodiLatentType.Output(display_name="jodi_latent", tooltip="The merged Jodi latent.")],
        )

    @classmethod
    def validate_inputs(cls, domain=None):
        return JodiLatentSplit.validate_inputs(domain)

    @classmethod
    def execute(cls, jodi_latent, latent, domain="image") -> io.NodeOutput:
        vocabulary.check_choice("domain", domain, DOMAIN_NAMES)
        if not isinstance(jodi_latent, payloads.LatentPayload):
            raise TypeError(f"jodi_latent must come from Jodi Sampler, got {type(jodi_latent).__name__}.")
        if not isinstance(latent, dict) or "samples" not in latent:
            raise TypeError("latent must be a LATENT ({'samples': tensor}).")
        source = latent.get("jodi_domain")
        if source is not None and source != domain:
            log.warning("Jodi Latent Merge: a %s latent goes into the %s slot; set 'domain' to %s to put it back.",
                        source, domain, source)
        return io.NodeOutput(jodi_latent.replace(domain, latent["samples"]))


NODES = [JodiDepthToControlNet, JodiNormalConvention, JodiSegToADE20K, JodiSegClassMask, JodiLatentSplit,
         JodiLatentMerge]
