"""Jodi Sampler at run time in the host: progress messages over the websocket, and Cancel (POST /interrupt)."""

import asyncio
import json
import threading
import time

import pytest
import torch

from .comfy_server import assert_progress_reaches

pytestmark = pytest.mark.host

DOMAINS = ("image", "lineart", "edge", "depth", "normal", "albedo", "segmentation", "openpose")


@pytest.fixture(autouse=True)
def _model_code():
    for module in ("jodi_core.loading", "jodi_core.dit.model", "jodi_core.dcae.model"):
        pytest.importorskip(module, reason=f"{module} not present yet")


def _sampler_graph(host_models, steps: int, seed: int, name: str) -> dict:
    return {
        "1": {"class_type": "JodiModelLoader",
              "inputs": {"ckpt_name": host_models.jodi_file, "dtype": "fp32", "attention": "torch"}},
        "2": {"class_type": "JodiVAELoader", "inputs": {"vae_name": host_models.vae_file, "dtype": "fp32"}},
        "3": {"class_type": "JodiRoles", "inputs": {f"{d}_role": "generate" for d in DOMAINS}},
        "4": {"class_type": "JodiSampler", "inputs": {
            "model": ["1", 0], "vae": ["2", 0], "roles": ["3", 0], "aspect": "1:1", "width": 64, "height": 64,
            "steps": steps, "cfg": 1.0, "seed": seed, "sampler": "euler-flow", "flow_shift": 3.0,
            "batch_size": 1}},
        "5": {"class_type": "JodiTestSaveTensors", "inputs": {"value": ["4", 0], "name": name}},
    }


async def _collect(comfy, prompt: dict, on_message=None, timeout: float = 300) -> list:
    """Queue ``prompt`` with a websocket open; return its JSON messages until the prompt has finished."""
    import aiohttp

    messages = []
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"{comfy.url.replace('http', 'ws')}/ws?clientId={comfy.client_id}") as ws:
            status, body = await asyncio.to_thread(comfy.queue_prompt, prompt)
            assert status == 200, body
            prompt_id = body["prompt_id"]
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                msg = await ws.receive(timeout=max(1.0, deadline - time.monotonic()))
                if msg.type == aiohttp.WSMsgType.BINARY:  # preview frames: event type, then its payload
                    event = int.from_bytes(msg.data[:4], "big")
                    messages.append({"type": "binary", "data": {"event": event, "payload": msg.data[4:]}})
                    continue
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data.get("data", {}).get("prompt_id") not in (None, prompt_id):
                    continue
                messages.append(data)
                if on_message is not None:
                    await asyncio.to_thread(on_message, data)
                if data["type"] == "executing" and data["data"].get("node") is None \
                        and data["data"].get("prompt_id") == prompt_id:
                    return messages
                if data["type"] in ("execution_error", "execution_interrupted"):
                    return messages
    raise TimeoutError(f"prompt did not finish; messages so far: {[m['type'] for m in messages]}")


def test_sampler_reports_progress_up_to_the_last_step(comfy, host_models):
    steps = 3
    messages = asyncio.run(_collect(comfy, _sampler_graph(host_models, steps, seed=101, name="progress")))
    assert_progress_reaches([m["data"] for m in messages if m["type"] == "progress" and m["data"].get("node") == "4"],
                            steps)
    assert any(m["type"] == "execution_success" for m in messages)


def test_sampler_sends_a_live_preview_of_the_image(comfy, host_models):
    """With previews on (the host runs --preview-method latent2rgb), the sampler sends the decoded image domain as
    a JPEG preview frame: at least the last step's, whatever the throttle."""
    import io

    from PIL import Image

    messages = asyncio.run(_collect(comfy, _sampler_graph(host_models, 3, seed=104, name="preview")))
    frames = [m["data"]["payload"] for m in messages if m["type"] == "binary" and m["data"]["event"] == 1]
    assert frames, f"no preview frame among {[m['type'] for m in messages]}"
    assert int.from_bytes(frames[-1][:4], "big") == 1  # JPEG
    preview = Image.open(io.BytesIO(frames[-1][4:]))
    assert preview.format == "JPEG" and preview.width == preview.height  # a 64 x 64 image, scaled to preview size
    assert any(m["type"] == "execution_success" for m in messages)


def test_interrupt_stops_the_sampler_and_the_server_keeps_serving(comfy, host_models):
    sent = threading.Event()

    def interrupt_after_first_step(message):
        if message["type"] == "progress" and message["data"].get("node") == "4" and not sent.is_set():
            sent.set()
            comfy.request("/interrupt", {})

    t0 = time.monotonic()
    messages = asyncio.run(_collect(comfy, _sampler_graph(host_models, 400, seed=202, name="interrupted"),
                                    on_message=interrupt_after_first_step))
    assert sent.is_set(), "the sampler never reported progress"
    kinds = [m["type"] for m in messages]
    assert "execution_interrupted" in kinds, kinds
    interrupted = next(m["data"] for m in messages if m["type"] == "execution_interrupted")
    assert interrupted["node_id"] == "4"
    steps_done = max(m["data"]["value"] for m in messages if m["type"] == "progress" and m["data"]["node"] == "4")
    assert steps_done < 400, f"ran {steps_done} of 400 steps in {time.monotonic() - t0:.0f} s"

    # A later prompt runs normally.
    entry = comfy.run_prompt(_sampler_graph(host_models, 2, seed=203, name="after_interrupt"))
    assert entry["status"]["status_str"] == "success"


def test_free_unloads_the_jodi_models_and_the_next_run_reloads_them(comfy, host_models, probe_dir):
    """'Free model and node cache' (POST /free) drops the Jodi patchers; the loaders run again and the same seed gives
    the same latent (loaded from the .pth in models/jodi this time)."""
    from safetensors.torch import load_file

    def graph(name):
        g = _sampler_graph(host_models, 2, seed=105, name=name)
        g["1"]["inputs"]["ckpt_name"] = host_models.jodi_pth_file
        return g

    assert comfy.run_prompt(graph("before_free"))["status"]["status_str"] == "success"
    attempt, _ = comfy.free_and_rerun(lambda attempt: graph(f"after_free_{attempt}"), {"1", "2"})
    before = load_file(probe_dir / "before_free.safetensors")["value.samples"]
    after = load_file(probe_dir / f"after_free_{attempt}.safetensors")["value.samples"]
    assert torch.equal(before, after)
