"""The node help pages on a real ComfyUI: served where the front end asks for them.

The front end's node help panel (front end 1.32.9 of ComfyUI 0.3.75 and 1.49.6 of 0.33.0 alike) takes a custom
node's pack folder from its ``python_module`` (``custom_nodes.<folder>``) and fetches
``/extensions/<folder>/docs/<node id>/<locale>.md``, then ``/extensions/<folder>/docs/<node id>.md``; the first
answer that is OK and not HTML is the page, otherwise it shows the node's description. ComfyUI serves a pack's
``WEB_DIRECTORY`` at ``/extensions/<folder>/``, so web/docs/<node id>.md answers the second request for every locale.
"""

from __future__ import annotations

import importlib.util
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from test_packaging import help_page_sockets  # tests/ is on sys.path (rootdir conftest)

from .comfy_server import PACK_FOLDER_NAME, REPO_ROOT

pytestmark = pytest.mark.host

LOCALE = "en"  # the front end's default
# The two template literals of the help fetcher in the front end's bundle (minified names differ per release).
_FRONT_END_URLS = {
    "localized": re.compile(r"`/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}/\$\{\w+\}\.md`"),
    "default": re.compile(r"`/extensions/\$\{\w+\}/docs/\$\{\w+\.name\}\.md`"),
}


def _pack_dir() -> Path:
    # The copy the server runs (JODI_HOST_PACK: e.g. an unpacked registry archive), not necessarily this checkout.
    return Path(os.environ.get("JODI_HOST_PACK", REPO_ROOT))


def _pack_folder(python_module: str) -> str | None:
    """The front end's reading of python_module: 'custom_nodes.<folder>[@version]' -> folder."""
    parts = python_module.split(".")
    return parts[1].split("@")[0] if len(parts) >= 2 and parts[0] == "custom_nodes" else None


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def _fetch_help(base_url: str, folder: str, node: str) -> tuple[str, int, str, bytes]:
    """What the front end does for a custom node's help: the localized page, then the default one."""
    tried = []
    for path in (f"/extensions/{folder}/docs/{node}/{LOCALE}.md", f"/extensions/{folder}/docs/{node}.md"):
        status, ctype, body = _get(base_url + urllib.parse.quote(path))
        if status == 200 and "text/html" not in ctype:
            return path, status, ctype, body
        tried.append(f"{path} -> {status} {ctype}")
    raise AssertionError(f"{node}: no help page served ({'; '.join(tried)})")


def _live_sockets(entry: dict) -> dict[str, list[str]]:
    """/object_info's sockets in the node contract's `name: TYPE` form."""
    inputs = []
    for section in ("required", "optional"):
        specs = entry["input"].get(section, {})
        for name in entry.get("input_order", {}).get(section, list(specs)):
            kind = specs[name][0]
            inputs.append(f"{name}: {kind if isinstance(kind, str) else 'COMBO'}")
    outputs = [f"{name}: {kind}" for kind, name in zip(entry["output"], entry["output_name"])]
    return {"inputs": inputs, "outputs": outputs}


@pytest.fixture(scope="module")
def pack_nodes(comfy) -> dict:
    info = comfy.object_info()
    nodes = {name: entry for name, entry in info.items()
             if entry.get("python_module") == f"custom_nodes.{PACK_FOLDER_NAME}"}
    assert nodes, "the pack registered no nodes:\n" + comfy.log_tail()
    return nodes


def test_front_end_fetches_custom_node_help_from_the_extensions_docs_folder(comfy):
    """The layout the pages rely on, read from the front end this host serves (its bundled JavaScript)."""
    spec = importlib.util.find_spec("comfyui_frontend_package")
    assert spec is not None and spec.submodule_search_locations, "comfyui_frontend_package is not installed"
    assets = Path(next(iter(spec.submodule_search_locations))) / "static" / "assets"
    found = set()
    for script in assets.glob("*.js"):
        text = script.read_text(encoding="utf-8", errors="replace")
        if "/docs/" in text:
            found |= {kind for kind, pattern in _FRONT_END_URLS.items() if pattern.search(text)}
    assert found == set(_FRONT_END_URLS), (
        f"the front end in {assets} no longer requests /extensions/<pack>/docs/<node>[/<locale>].md "
        f"(found: {sorted(found)})")


def test_every_pack_node_help_page_is_served(comfy, pack_nodes):
    problems = []
    for node, entry in sorted(pack_nodes.items()):
        folder = _pack_folder(entry["python_module"])
        assert folder == PACK_FOLDER_NAME, entry["python_module"]
        try:
            path, _, ctype, body = _fetch_help(comfy.url, folder, node)
        except AssertionError as e:
            problems.append(str(e))
            continue
        # The front end takes any OK answer that is not HTML. The type itself varies: aiohttp guesses it from its
        # own table, which has no .md before Python 3.13 (application/octet-stream; text/markdown later).
        if "text/html" in ctype:
            problems.append(f"{node}: {path} served as {ctype!r}")
        local = _pack_dir() / "web" / "docs" / f"{node}.md"
        if not local.is_file() or body != local.read_bytes():
            problems.append(f"{node}: {path} is not the pack's web/docs/{node}.md")
            continue
        text = body.decode("utf-8")
        title = text.splitlines()[0]
        if title != f"# {entry['display_name']}":
            problems.append(f"{node}: page title {title!r}, node display name {entry['display_name']!r}")
        if help_page_sockets(text) != _live_sockets(entry):
            problems.append(f"{node}: the page's inputs/outputs differ from /object_info: "
                            f"{help_page_sockets(text)} != {_live_sockets(entry)}")
    assert not problems, "\n".join(problems)


def test_a_node_without_a_page_gets_no_page(comfy):
    """A missing page must be a plain 404 (the front end then shows the description), not an HTML fallback."""
    status, ctype, _ = _get(comfy.url + f"/extensions/{PACK_FOLDER_NAME}/docs/JodiNoSuchNode.md")
    assert status == 404 and "text/html" not in ctype, (status, ctype)
