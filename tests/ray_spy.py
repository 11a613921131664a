"""A Ray worker set-up hook for tests/test_annotate_scale.py (``runtime_env={"worker_process_setup_hook":
"ray_spy.install"}``): from inside every Ray worker process it records each sampler call (its batch size), each
annotate writer pool made, each Jodi pipeline and Janus model loaded and each caption written, one JSON line per event with the worker's pid, in the file ``JODI_TEST_SPY`` names."""

from __future__ import annotations

import json
import os

SPY_ENV = "JODI_TEST_SPY"


def _record(path: str, **event) -> None:
    line = (json.dumps({"pid": os.getpid(), **event}) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write per line: lines of several processes do not interleave
    finally:
        os.close(fd)


def install() -> None:
    path = os.environ.get(SPY_ENV)
    if not path:
        return
    import concurrent.futures

    from jodi_core.pipeline import JodiPipeline

    pool_init = concurrent.futures.ThreadPoolExecutor.__init__

    def spy_pool_init(self, *args, **kwargs):
        if kwargs.get("thread_name_prefix", "").startswith("jodi-annotate-write"):
            _record(path, event="writer_pool")
        pool_init(self, *args, **kwargs)

    concurrent.futures.ThreadPoolExecutor.__init__ = spy_pool_init
    call = JodiPipeline.__call__

    def spy_call(self, *args, **kwargs):
        _record(path, event="sample", batch=len(kwargs.get("seeds") or [None]))
        return call(self, *args, **kwargs)

    JodiPipeline.__call__ = spy_call
    init = JodiPipeline.__init__

    def spy_init(self, *args, **kwargs):
        _record(path, event="jodi_load")
        init(self, *args, **kwargs)

    JodiPipeline.__init__ = spy_init

    import jodi_core.janus
    from jodi_core.captioning import Captioner

    load_janus = jodi_core.janus.load_janus

    def spy_load_janus(*args, **kwargs):
        _record(path, event="janus_load")
        return load_janus(*args, **kwargs)

    jodi_core.janus.load_janus = spy_load_janus  # annotate imports it from the package when it loads Janus
    caption = Captioner.caption

    def spy_caption(self, image, key):
        _record(path, event="caption", key=key)
        return caption(self, image, key)

    Captioner.caption = spy_caption
