"""Jodi Roles: which domains the sampler generates, which it takes as conditions, which it leaves out."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..jodi_core.domains import DOMAIN_NAMES, parse_roles
from . import common, payloads, vocabulary

_UNSET = object()  # validate_inputs: a linked input arrives as None, an unconnected one is absent

_ROLE_TIP = (
    "auto: condition if an image is connected, else generate. generate: the model makes this map. condition: the "
    "connected image guides the others. ignore: the domain is left out of the run (faster)."
)


class JodiRoles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        inputs = []
        for name in DOMAIN_NAMES:
            inputs.append(io.Image.Input(
                name, optional=True,
                tooltip=f"Optional {name} image ({common.DOMAIN_TOOLTIPS[name]}) to use as a condition. Any size: "
                        "it is brought to the run's size as the sampler's condition_fit says (stretch by "
                        "default)."))
        for name in DOMAIN_NAMES:
            inputs.append(io.Combo.Input(
                f"{name}_role", options=list(vocabulary.ROLE_CHOICES), default=vocabulary.ROLE_AUTO,
                tooltip=f"Role of the {name} domain. {_ROLE_TIP}"))
        return io.Schema(
            node_id="JodiRoles",
            display_name="Jodi Roles / Conditions",
            category="Jodi/conditioning",
            description=(
                "Sets the role of each of Jodi's 8 domains (image, lineart, edge, depth, normal, albedo, "
                "segmentation, openpose) and carries the condition images. Nothing connected = joint generation; "
                "label maps connected = controllable generation; the image connected = perception."
            ),
            inputs=inputs,
            outputs=[common.JodiRolesType.Output(
                display_name="roles", tooltip="Roles and condition images for Jodi Sampler.")],
        )

    @classmethod
    def validate_inputs(cls, image=_UNSET, lineart=_UNSET, edge=_UNSET, depth=_UNSET, normal=_UNSET, albedo=_UNSET,
                        segmentation=_UNSET, openpose=_UNSET, image_role=None, lineart_role=None, edge_role=None,
                        depth_role=None, normal_role=None, albedo_role=None, segmentation_role=None,
                        openpose_role=None):
        values = locals()
        try:
            resolved = []
            for name in DOMAIN_NAMES:
                choice = values[f"{name}_role"]
                if choice is not None:  # None: the role comes from a link, checked when the node runs
                    resolved.append(vocabulary.resolve_role(name, choice, values[name] is not _UNSET))
            if len(resolved) == len(DOMAIN_NAMES):
                parse_roles([resolved])  # at least one domain generated, not all ignored
        except ValueError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, **kwargs) -> io.NodeOutput:
        choices = {name: kwargs.get(f"{name}_role", vocabulary.ROLE_AUTO) for name in DOMAIN_NAMES}
        images = {name: kwargs.get(name) for name in DOMAIN_NAMES}
        return io.NodeOutput(payloads.RolesPayload.from_choices(choices, images))


NODES = [JodiRoles]
