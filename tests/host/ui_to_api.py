"""Convert a UI-format workflow (what the front end saves, what workflows/*.json hold) into the API prompt format.

ComfyUI's backend has no such converter (the front end does it in ``graphToPrompt``). This one follows the rules
in comfyui_host.md §G, driven by the server's /object_info:
- widget inputs (INT, FLOAT, STRING, BOOLEAN, COMBO, list types) take the next ``widgets_values`` item in input
  order; an input with ``control_after_generate`` consumes one extra item, an upload combo too;
- a widget turned into a socket takes its link, but still consumes its ``widgets_values`` slot;
- optional widgets at the end that a workflow saved before they existed lacks keep their defaults (left out);
- muted nodes (mode 2) are dropped, bypassed nodes (mode 4) are wired through (first input of the same type),
  Reroute nodes are followed, PrimitiveNode values are pushed into their targets, Note/MarkdownNote are dropped.
"""

from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
MODE_MUTED, MODE_BYPASS = 2, 4


class ConversionError(ValueError):
    pass


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _extra_values(spec) -> int:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return int(bool(opts.get("control_after_generate"))) + int(bool(opts.get("image_upload")))


def convert(workflow: dict, object_info: dict) -> dict:
    if "nodes" not in workflow or "links" not in workflow:
        raise ConversionError("not a UI-format workflow (no 'nodes'/'links')")
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {}
    for link in workflow["links"]:
        if isinstance(link, dict):  # newer front ends write object links
            links[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"])
        else:
            link_id, src, src_slot, dst, dst_slot = link[:5]
            links[link_id] = (src, src_slot, dst, dst_slot)

    def source(link_id):
        """Follow Reroutes and bypassed nodes to the real (node id, slot) feeding a link, or a primitive value."""
        seen = set()
        while True:
            if link_id in seen:
                raise ConversionError(f"link cycle at {link_id}")
            seen.add(link_id)
            src, slot = links[link_id][:2]
            node = nodes[src]
            if node["type"] == "Reroute" or node.get("mode") == MODE_BYPASS:
                out_type = node["outputs"][slot]["type"] if node.get("outputs") else None
                feeding = [i for i in node.get("inputs", []) if i.get("link") is not None
                           and (node["type"] == "Reroute" or i.get("type") == out_type)]
                if not feeding:
                    return None
                link_id = feeding[0]["link"]
                continue
            if node["type"] == "PrimitiveNode":
                return ("value", node["widgets_values"][0])
            return (str(src), slot)

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASS):
            continue
        if kind not in object_info:
            raise ConversionError(f"node {node_id}: unknown class {kind!r}")
        info = object_info[kind]
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        values = node.get("widgets_values", [])
        optional = set(info["input_order"].get("optional", []))
        inputs, pos, unsaved = {}, 0, []
        for name in order:
            spec = specs[name]
            widget = _is_widget(spec)
            if widget and not isinstance(values, dict):
                value = values[pos] if pos < len(values) else None
                if pos >= len(values):
                    unsaved.append(name)
                pos += 1 + _extra_values(spec)
            elif widget:
                value = values.get(name)
            if name in linked:
                src = source(linked[name])
                if src is None:
                    continue
                inputs[name] = src[1] if src[0] == "value" else [src[0], src[1]]
            elif widget and value is not None:
                inputs[name] = value
        # A workflow saved before an optional widget was added lacks its value: the front end gives it its default.
        if not isinstance(values, dict) and pos != len(values) and not (unsaved and set(unsaved) <= optional):
            raise ConversionError(
                f"node {node_id} ({kind}): {len(values)} widget values for {pos} widget slots; the workflow does "
                "not match this node's inputs (renamed, added or removed widget?)")
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs}
    return prompt
