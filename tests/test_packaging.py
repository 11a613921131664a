"""What ships beside the code: the registry and ComfyUI-Manager metadata, and the README's workflow screenshots."""

import json
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def test_registry_fields_are_filled():
    comfy = PYPROJECT["tool"]["comfy"]
    for field in ("PublisherId", "DisplayName", "Icon"):
        assert comfy.get(field), f"[tool.comfy] {field} is empty"


def test_icon_is_a_png_in_this_repo():
    # The registry shows the icon from its URL: a raw file of this repository's main branch.
    icon = urlparse(PYPROJECT["tool"]["comfy"]["Icon"])
    repo = urlparse(PYPROJECT["project"]["urls"]["Repository"]).path.strip("/")
    assert icon.scheme == "https" and icon.netloc == "raw.githubusercontent.com", icon
    prefix = f"/{repo}/main/"
    assert icon.path.startswith(prefix), f"icon {icon.path} is not a file of {repo}"
    path = REPO / icon.path[len(prefix):]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"


def test_requirements_txt_lists_the_runtime_dependencies():
    # ComfyUI-Manager installs requirements.txt, pip installs pyproject: the two must not drift apart.
    def names(lines):
        return {re.split(r"[<>=~!; \[]", line.strip(), maxsplit=1)[0].lower() for line in lines
                if line.strip() and not line.lstrip().startswith("#")}

    required = (REPO / "requirements.txt").read_text().splitlines()
    assert names(required) == names(PYPROJECT["project"]["dependencies"])


def test_readme_screenshots_show_the_current_workflows():
    """tools/screenshot_workflows.py records a digest of each workflow it rendered: a workflow changed since then
    means the README shows an old graph."""
    import hashlib
    import json

    rendered = json.loads((REPO / "docs" / "screenshots" / "rendered.json").read_text())
    workflows = sorted((REPO / "workflows").glob("*.json"))
    assert sorted(rendered) == [w.stem for w in workflows]
    def digest(path):  # as tools/screenshot_workflows.py takes it: line endings do not count
        return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()

    stale = [w.name for w in workflows if digest(w) != rendered[w.stem]]
    assert not stale, f"re-render the screenshots (python tools/screenshot_workflows.py): {stale} changed"
    readme = (REPO / "README.md").read_text()
    assert all(f"docs/screenshots/{w.stem}.png" in readme for w in workflows)


# ---------------------------------------------------------------------------------------------------------------------
# Registry fields: [tool.comfy] requires-comfyui, the OS / accelerator classifiers, the documentation and issue links
# ---------------------------------------------------------------------------------------------------------------------

TESTED_HOSTS = ("0.3.75", "0.33.0")  # the ComfyUI releases the host test suite runs on
# What comfy-cli and ComfyUI's comfy_config accept: an optional operator and X.Y.Z, comma-separated parts.
_REGISTRY_VERSION = re.compile(r"^(==|>=|<=|!=|~=|>|<|<>|=)?\s*(\d+)\.(\d+)\.(\d+)$")
_REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                          "GPU :: Apple Metal"}


def _in_range(version: str, spec: str) -> bool:
    v = tuple(int(x) for x in version.split("."))
    ops = {"==": v.__eq__, "=": v.__eq__, ">=": v.__ge__, "<=": v.__le__, ">": v.__gt__, "<": v.__lt__,
           "!=": v.__ne__, "<>": v.__ne__}
    for part in spec.split(","):
        m = _REGISTRY_VERSION.match(part.strip())
        assert m, f"requires-comfyui part {part!r} is not [operator]X.Y.Z, which the registry drops"
        op, bound = m.group(1) or "==", tuple(int(x) for x in m.groups()[1:])
        assert op != "~=", "~= is not evaluated here; use explicit bounds"
        if not ops[op](bound):
            return False
    return True


def test_requires_comfyui_covers_the_tested_hosts():
    spec = PYPROJECT["tool"]["comfy"].get("requires-comfyui", "")
    assert spec, "[tool.comfy] requires-comfyui is missing"
    for version in TESTED_HOSTS:
        assert _in_range(version, spec), f"{spec!r} excludes the tested host {version}"
    assert not _in_range("0.3.74", spec), f"{spec!r} claims hosts older than the oldest tested one"
    assert not _in_range("0.34.0", spec), f"{spec!r} claims a minor release no test has run on"


def test_classifiers_are_the_registry_os_and_accelerator_ones():
    """The registry keeps OS classifiers only if all start with a known prefix, and accelerator ones only if all are
    from its list; one stray value drops the whole kind."""
    classifiers = PYPROJECT["project"].get("classifiers", [])
    oses = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    envs = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment ::")]
    assert oses and all(o.startswith(("Microsoft", "POSIX", "MacOS", "OS Independent")) for o in oses), oses
    assert envs and set(envs) <= _REGISTRY_ACCELERATORS, envs


def test_documentation_and_issue_links_point_at_the_repository():
    urls = PYPROJECT["project"]["urls"]
    repo = urls["Repository"].rstrip("/")
    assert urlparse(repo).scheme == "https"
    assert urls.get("Documentation", "").startswith(repo), "Documentation should be the repository's README"
    # "Bug Tracker" is the registry docs' name; "Issues" is the key comfy-cli and ComfyUI's parser read.
    for key in ("Bug Tracker", "Issues"):
        assert urls.get(key) == f"{repo}/issues", f"[project.urls] {key}"


# ---------------------------------------------------------------------------------------------------------------------
# .comfyignore: what the registry archive (`comfy node pack`) leaves out
# ---------------------------------------------------------------------------------------------------------------------

COMFYIGNORE = REPO / ".comfyignore"


def _comfyignore_patterns() -> list[str]:
    # Read as comfy-cli reads it: stripped lines, blank ones and '#' comments skipped.
    return [line.strip() for line in COMFYIGNORE.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """gitwildmatch for anchored literal patterns ("/dir/" or "/file"), the only kind the file may hold."""
    for pattern in patterns:
        target = pattern.strip("/")
        if path == target and not pattern.endswith("/") or path.startswith(target + "/"):
            return True
    return False


def test_comfyignore_leaves_dev_files_out_and_keeps_what_the_nodes_need():
    assert COMFYIGNORE.is_file(), "no .comfyignore: the registry archive would carry the tests and benchmarks"
    patterns = _comfyignore_patterns()
    # Anchored literals only: an unanchored "tests/" would also drop any jodi_core/**/tests/ folder.
    assert all(p.startswith("/") and not set(p) & set("*?[!\\") for p in patterns), patterns
    dropped = ["tests/test_packaging.py", "tests/host/node_contract.json", "benchmarks/README.md",
               "docs/screenshots/jodi_perception.png"]
    assert [p for p in dropped if not _ignored(p, patterns)] == []
    kept = ["__init__.py", "pyproject.toml", "requirements.txt", "README.md", "nodes/__init__.py",
            "jodi_core/__init__.py", "jodi_core/assets/palettes.json"]
    kept += [p.relative_to(REPO).as_posix() for p in (REPO / "jodi_core" / "assets").rglob("*") if p.is_file()]
    kept += [p.relative_to(REPO).as_posix() for p in (REPO / "workflows").glob("*.json")]  # the templates
    kept += [p.relative_to(REPO).as_posix() for p in HELP_DIR.rglob("*.md")]
    assert [p for p in kept if _ignored(p, patterns)] == []


# ---------------------------------------------------------------------------------------------------------------------
# Node help pages (web/docs/<node id>.md, shown by the front end's node help panel)
# ---------------------------------------------------------------------------------------------------------------------

HELP_DIR = REPO / "web" / "docs"
NODE_CONTRACT = json.loads((REPO / "tests" / "host" / "node_contract.json").read_text())
_SOCKET_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|")
_TEMPLATES = re.compile(r"((?:`[a-z0-9_]+`(?:,|\s+and|\s+or)?\s+)+)templates?\b")  # "the `a` and `b` templates"


def help_page_sections(text: str) -> dict[str, list[str]]:
    """A help page's "## " sections: title -> lines."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("## "):
            current = sections.setdefault(line[3:].strip().lower(), [])
        elif current is not None:
            current.append(line)
    return sections


def help_page_sockets(text: str) -> dict[str, list[str]]:
    """The `name: TYPE` rows of a page's Inputs and Outputs tables, in order (the node contract's format)."""
    sections = help_page_sections(text)
    return {kind: [f"{m[1]}: {m[2]}" for m in map(_SOCKET_ROW.match, sections.get(kind, [])) if m]
            for kind in ("inputs", "outputs")}


def test_pack_serves_its_web_directory():
    """ComfyUI serves the folder named by the root module's WEB_DIRECTORY at /extensions/<pack folder>/."""
    import ast

    tree = ast.parse((REPO / "__init__.py").read_text())
    values = [node.value.value for node in tree.body if isinstance(node, ast.Assign)
              and [getattr(t, "id", None) for t in node.targets] == ["WEB_DIRECTORY"]]
    assert len(values) == 1, "the root __init__.py must set WEB_DIRECTORY once, unconditionally"
    assert (REPO / values[0]).resolve() == HELP_DIR.parent


def test_every_node_has_a_help_page_naming_its_sockets():
    problems = []
    for node, contract in sorted(NODE_CONTRACT.items()):
        page = HELP_DIR / f"{node}.md"
        if not page.is_file():
            problems.append(f"{node}: no {page.relative_to(REPO)}")
            continue
        text = page.read_text(encoding="utf-8")
        if not text.startswith("# "):
            problems.append(f"{node}: the page does not start with a '# <display name>' title")
        sockets = help_page_sockets(text)
        if sockets["inputs"] != contract["required"] + contract["optional"]:
            problems.append(f"{node}: inputs {sockets['inputs']} != {contract['required'] + contract['optional']}")
        if sockets["outputs"] != contract["outputs"]:
            problems.append(f"{node}: outputs {sockets['outputs']} != {contract['outputs']}")
        if not "".join(help_page_sections(text).get("typical chain", [])).strip():
            problems.append(f"{node}: no '## Typical chain' section")
    assert not problems, "\n".join(problems)


def test_help_pages_are_only_for_registered_nodes_and_name_real_templates():
    pages = sorted(p.relative_to(HELP_DIR) for p in HELP_DIR.rglob("*") if p.is_file())
    # <node id>.md, or a locale variant <node id>/<locale>.md; anything else (a .js file would even be run by the
    # front end as an extension) does not belong here.
    strays = [str(p) for p in pages if p.suffix != ".md" or (p.parent.name or p.stem) not in NODE_CONTRACT]
    assert not strays, f"files in web/docs that are no node's help page: {strays}"
    assert not [p for p in (REPO / "web").rglob("*.js")], "web/ holds JavaScript the front end would load"
    templates = {p.stem for p in (REPO / "workflows").glob("*.json")}
    for page in HELP_DIR.rglob("*.md"):
        named = {n for group in _TEMPLATES.findall(page.read_text(encoding="utf-8"))
                 for n in re.findall(r"`([a-z0-9_]+)`", group)}
        assert named <= templates, f"{page.name} names templates that workflows/ lacks: {sorted(named - templates)}"
