"""What ships beside the code: the registry and ComfyUI-Manager metadata, and the README's workflow screenshots."""

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
