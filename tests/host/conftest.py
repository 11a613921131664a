"""Fixtures for the host tests: ONE real ComfyUI server per test session, with this pack installed.

The server runs from the ComfyUI folder named by JODI_COMFYUI (``.ci/host-suite``), else from a cached copy of
ComfyUI 0.3.75 (comfy_server.py), with ``--cpu``, an in-memory database and a temporary base directory. Its model
folders point (through an extra_model_paths.yaml) at a temporary directory holding tiny random-weight models in the
official file formats:

- ``diffusion_models/jodi-tiny.safetensors`` and ``jodi/jodi-tiny.pth``: a tiny Jodi DiT (official keys; the
  golden-fixture weights, or built with jodi_core's modules where the fixtures are absent);
- ``vae/dcae-tiny.safetensors``: a tiny DC-AE (official mit-han-lab keys, same rule);
- ``text_encoders/gemma-2-2b-it-tiny.safetensors``: a tiny Gemma-2 made by ``convert_gemma`` from a Hugging Face
  folder (its captions are 48 wide, the tiny DiT's caption width);
- ``Janus-Pro/janus-tiny``: a tiny random Janus folder with its tokenizer.json (tests/janus_tiny.py);
- links under the names the shipped workflows give the real models (Jodi.pth, the DC-AE, gemma-2-2b-it,
  Janus-Pro-1B) pointing at those tiny files, so every workflow runs as shipped.

A test-only probe pack (tests/host/probe_pack) adds an output node that dumps tensors, and shrinks ComfyUI's fixed
Gemma-2-2B config to the tiny one so the real CLIPLoader can load the tiny file.

The fixture skips only when ComfyUI cannot be obtained at all; missing Python dependencies are an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from .comfy_server import ComfyServer, ComfyUnavailable, cache_dir, ensure_comfyui, host_version, \
    missing_startup_modules, write_extra_model_paths
from .tiny_models import comfy_gemma_overrides, write_tiny_gemma_folder

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
PROBE_NODE = "JodiTestSaveTensors"


@dataclass
class HostModels:
    root: Path  # the models folder the server sees
    gemma_hf: Path  # Hugging Face folder the Gemma file was converted from (for HF references)
    gemma_file: str = "gemma-2-2b-it-tiny.safetensors"
    jodi_file: str = "jodi-tiny.safetensors"
    jodi_pth_file: str = "jodi-tiny.pth"
    vae_file: str = "dcae-tiny.safetensors"
    janus_dir: str = "janus-tiny"


def _fixture_dir() -> Path:
    from conftest import FIXTURES_DIR  # tests/conftest.py: the repo's copy, or JODI_SHARED / JODI_FIXTURES

    return FIXTURES_DIR


def _write_jodi_models(models: Path) -> None:
    """Tiny DiT (caption width 48, like the tiny Gemma) and DC-AE in the official file formats.

    The golden-fixture weights are used when present (official keys, made by the reference code); otherwise the
    same shapes are built with jodi_core's own modules, whose state-dict keys are the official ones.
    """
    from safetensors.torch import load_file, save_file

    for sub in ("diffusion_models", "jodi", "vae"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    fixtures = _fixture_dir()
    dit_src, vae_src = fixtures / "dit_tiny_weights.safetensors", fixtures / "dcae_tiny_weights.safetensors"
    if dit_src.is_file() and vae_src.is_file():
        dit_sd, vae_sd = load_file(dit_src), load_file(vae_src)
    else:
        dit_sd, vae_sd = _build_tiny_jodi()
    save_file(dit_sd, models / "diffusion_models" / HostModels.jodi_file)
    # The official release is a pickled {'state_dict': ...}; keep one in that form too.
    torch.save({"state_dict": dit_sd}, models / "jodi" / HostModels.jodi_pth_file)
    save_file(vae_sd, models / "vae" / HostModels.vae_file)


def _build_tiny_jodi() -> tuple[dict, dict]:
    from jodi_core.jobs.demo import tiny_random_models
    from jodi_core.dit.model import JodiConfig, JodiTransformer

    _, vae = tiny_random_models(seed=0)  # 4-stage DC-AE, 8 latent channels
    dit = JodiTransformer(JodiConfig(hidden_size=64, depth=2, num_heads=2, caption_channels=48,
                                     in_channels=vae.config.latent_channels, base_size=8))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in list(dit.parameters()) + list(dit.buffers()):
            if t.is_floating_point():
                fan_in = max(1, t[0].numel()) if t.dim() > 1 else t.numel()
                t.copy_(torch.randn(t.shape, generator=gen) / fan_in**0.5)
    return ({k: v.contiguous() for k, v in dit.state_dict().items()},
            {k: v.contiguous() for k, v in vae.state_dict().items()})


def _link_workflow_models(models: Path) -> None:
    """Tiny stand-ins under the model names the shipped workflows use (workflows/api/manifest.json "models")."""
    from pack_modules import pack_module

    demo = pack_module("nodes.vocabulary").DEMO_MODEL_CHOICE
    manifest = REPO_ROOT / "workflows" / "api" / "manifest.json"
    entries = json.loads(manifest.read_text()).values() if manifest.is_file() else []
    for entry in entries:
        for folder, names in entry.get("models", {}).items():
            for name in names:
                if folder == "diffusion_models|jodi" and name != demo:
                    sub = "jodi" if name.endswith(".pth") else "diffusion_models"
                    src = HostModels.jodi_pth_file if sub == "jodi" else HostModels.jodi_file
                elif folder == "vae" and name != demo:
                    sub, src = "vae", HostModels.vae_file
                elif folder == "text_encoders":
                    sub, src = "text_encoders", HostModels.gemma_file
                elif folder == "Janus-Pro":
                    sub, src = "Janus-Pro", HostModels.janus_dir
                else:  # the demo model is built in; SD 1.5 files come from the sd15_models fixture
                    continue
                link = models / sub / name
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(models / sub / src)


@pytest.fixture(scope="session")
def host_models(tmp_path_factory) -> HostModels:
    from janus_tiny import write_tiny_janus
    from jodi_core.gemma import convert_gemma

    root = tmp_path_factory.mktemp("host_models")
    models = root / "models"
    _write_jodi_models(models)
    gemma_hf = write_tiny_gemma_folder(root / "hf" / "gemma-2-2b-it-tiny")
    convert_gemma(gemma_hf, models / "text_encoders" / HostModels.gemma_file)
    write_tiny_janus(models / "Janus-Pro" / HostModels.janus_dir, layout="original", seed=0)
    _link_workflow_models(models)
    return HostModels(root=models, gemma_hf=gemma_hf)


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    try:
        return ensure_comfyui()
    except ComfyUnavailable as e:
        # A silent skip would let a run without network pass every host test vacuously: fail unless asked to skip.
        if os.environ.get("JODI_SKIP_HOST"):
            pytest.skip(f"ComfyUI {e} (JODI_SKIP_HOST is set)")
        pytest.fail(f"ComfyUI {e}. Set JODI_SKIP_HOST=1 to skip the host tests on a machine that cannot get it.")


@pytest.fixture(scope="session")
def comfy(comfy_dir, host_models, tmp_path_factory) -> ComfyServer:
    missing = missing_startup_modules(comfy_dir)
    if missing:
        pytest.fail(f"the test environment lacks what ComfyUI {host_version(comfy_dir)} needs at start-up: "
                    + ", ".join(missing))
    base = tmp_path_factory.mktemp("comfy_base")
    write_extra_model_paths(base / "extra_model_paths.yaml", host_models.root, {
        "diffusion_models": "diffusion_models", "jodi": "jodi", "vae": "vae", "text_encoders": "text_encoders",
        "checkpoints": "checkpoints", "controlnet": "controlnet", "Janus-Pro": "Janus-Pro"})
    server = ComfyServer(
        comfy_dir=comfy_dir, base_dir=base, models_dir=host_models.root,
        extra_custom_nodes={"jodi_host_probe": HERE / "probe_pack"},
        env={"JODI_TEST_GEMMA_CONFIG": json.dumps(comfy_gemma_overrides()), "OMP_NUM_THREADS": "2"},
    )
    server.start(ready_node=PROBE_NODE)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def probe_dir(comfy) -> Path:
    return comfy.output_dir / "jodi_probe"


@pytest.fixture(scope="session")
def sd15_models(comfy, host_models):
    """Install random-weight SD 1.5 + ControlNet files under the names the ControlNet-chain workflow uses.

    Built once per machine with ComfyUI's own classes (in a subprocess) and kept in the ComfyUI cache, since the
    fixed-size CLIP-L and VAE make the checkpoint ~0.47 GB.
    """

    def install(checkpoints: list[str], controlnets: list[str]) -> None:
        cache = cache_dir() / "sd15-tiny"
        ckpt, nets = cache / "sd15-tiny.safetensors", [cache / f"controlnet-tiny-{i}.pth" for i in range(2)]
        if not ckpt.is_file() or not all(n.is_file() for n in nets):
            cache.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, str(HERE / "make_sd15_tiny.py"), str(comfy.comfy_dir), str(ckpt), *map(str, nets)]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                pytest.fail(f"building the tiny SD 1.5 models failed:\n{proc.stderr[-3000:]}")
        for folder, names, sources in (("checkpoints", checkpoints, [ckpt]), ("controlnet", controlnets, nets)):
            (host_models.root / folder).mkdir(exist_ok=True)
            for i, name in enumerate(names):
                link = host_models.root / folder / name
                if not link.exists():
                    link.symlink_to(sources[i % len(sources)])

    return install
