"""Render every shipped workflow in ComfyUI's real front end (headless Chromium) and save a screenshot of each.

Also checks that the front end's own API conversion (``app.graphToPrompt``) of each UI workflow equals its API twin
in ``workflows/api/``. Needs Debian's ``chromium`` (``apt-get install chromium``) and the test extra; ComfyUI 0.3.75
comes from the same cache as the host tests (``tests/host/comfy_server.py``).

    python tools/screenshot_workflows.py --out docs/screenshots
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO / "tests" / "data"  # the repo's copy of the test data


def _inputs(node: dict) -> dict:
    # PreviewAny's text box is display-only: the front end serialises it, the server ignores it.
    if node["class_type"] == "PreviewAny":
        return {k: v for k, v in node["inputs"].items() if k != "preview"}
    return node["inputs"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_comfyui(base: Path) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(REPO))
    from tests.host.comfy_server import ensure_comfyui

    comfy = ensure_comfyui()
    (base / "custom_nodes").mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-Jodi").symlink_to(REPO)
    (base / "user").mkdir()
    (base / "input").mkdir()
    manifest = json.loads((REPO / "workflows" / "api" / "manifest.json").read_text())
    for entry in manifest.values():
        for name, source in (entry.get("inputs") or {}).items():
            shutil.copy(SHARED_DATA / source, base / "input" / name)
    port = _free_port()
    log = open(base / "comfyui.log", "w")
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:"]
    proc = subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited early; see {base / 'comfyui.log'}")
        try:
            if json.load(urllib.request.urlopen(url + "/object_info/JodiSampler")):
                break
        except OSError:
            time.sleep(0.5)
    # Skip the first-run templates dialog, and hide the minimap: both would cover the canvas.
    for setting, value in (("Comfy.TutorialCompleted", b"true"), ("Comfy.Minimap.Visible", b"false")):
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/settings/{setting}", data=value, method="POST"))
    return proc, url


async def _shoot(url: str, debug_port: int, workflows: list[Path], out: Path) -> bool:
    import aiohttp

    for _ in range(60):
        try:
            pages = json.load(urllib.request.urlopen(f"http://127.0.0.1:{debug_port}/json"))
            break
        except OSError:
            await asyncio.sleep(0.5)
    ws_url = next(p for p in pages if p.get("type") == "page")["webSocketDebuggerUrl"]
    all_same = True
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        counter = 0

        async def call(method, **params):
            nonlocal counter
            counter += 1
            await ws.send_json({"id": counter, "method": method, "params": params})
            while True:
                msg = await ws.receive_json()
                if msg.get("id") == counter:
                    return msg

        async def evaluate(expr):
            r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
            return r.get("result", {}).get("result", {}).get("value")

        await call("Page.enable")
        await call("Runtime.enable")
        await call("Emulation.setDeviceMetricsOverride", width=1600, height=1000, deviceScaleFactor=1, mobile=False)
        # The front end's "Nodes 2.0" banner remembers its dismissal in localStorage.
        await call("Page.addScriptToEvaluateOnNewDocument",
                   source="localStorage.setItem('vueNodesBannerDismissed', 'true')")
        await call("Page.navigate", url=url + "/")
        app = "(window.app || (window.comfyAPI && window.comfyAPI.app && window.comfyAPI.app.app))"
        for _ in range(120):
            if await evaluate(f"!!({app} && window.LiteGraph && LiteGraph.registered_node_types['JodiSampler'])"):
                break
            await asyncio.sleep(0.5)
        for path in workflows:
            name = path.stem
            expr = (f"(async()=>{{const a = {app}; await a.loadGraphData({path.read_text()}, true, true, '{name}', "
                    "{showMissingNodesDialog:false, showMissingModelsDialog:false}); "
                    "const p = await a.graphToPrompt(); return JSON.stringify(p.output);})()")
            got = json.loads(await evaluate(expr) or "{}")
            twin = json.loads((REPO / "workflows" / "api" / f"{name}.json").read_text())
            strip = lambda p: {k: (v["class_type"], _inputs(v)) for k, v in p.items()}  # noqa: E731
            same = strip(got) == strip(twin)
            all_same &= same
            print(f"{name}: front end conversion {'equals' if same else 'DIFFERS FROM'} the API twin")
            for node in sorted(set(got) | set(twin)) if not same else ():
                if strip(got).get(node) != strip(twin).get(node):
                    print(f"  node {node}:\n    front end: {strip(got).get(node)}\n    twin:      {strip(twin).get(node)}")
            await asyncio.sleep(1.5)
            for kind in ("keyDown", "keyUp"):  # close any dialog
                await call("Input.dispatchKeyEvent", type=kind, key="Escape", code="Escape", windowsVirtualKeyCode=27)
            shot = await call("Page.captureScreenshot", format="png")
            (out / f"{name}.png").write_bytes(base64.b64decode(shot["result"]["data"]))
    return all_same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workflows = sorted((REPO / "workflows").glob("*.json"))
    with tempfile.TemporaryDirectory(prefix="jodi_fe_") as tmp:
        base = Path(tmp)
        proc, url = _start_comfyui(base / "comfy")
        debug_port = _free_port()
        chrome = subprocess.Popen(
            [args.chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-allow-origins=*", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", f"--remote-debugging-port={debug_port}", f"--user-data-dir={base / 'chrome'}",
             "--window-size=1600,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            same = asyncio.run(_shoot(url, debug_port, workflows, out))
        finally:
            chrome.terminate()
            proc.terminate()
            proc.wait(15)
            chrome.wait(15)
    # What was rendered: tests/test_packaging.py fails when a workflow changes without new screenshots.
    if same:
        rendered = {path.stem: workflow_digest(path) for path in workflows}
        (out / "rendered.json").write_text(json.dumps(rendered, indent=1, sort_keys=True) + "\n")
    print(f"screenshots in {out}")
    return 0 if same else 1


def workflow_digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes().replace(b"\r\n", b"\n")).hexdigest()  # same on a CRLF checkout


if __name__ == "__main__":
    sys.exit(main())
