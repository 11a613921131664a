"""A Ray worker set-up hook for tests/test_annotate_scale.py (``runtime_env={"worker_process_setup_hook":
"ray_spy.install"}``): from inside every Ray worker process it records each sampler call (its batch size) and each
annotate writer pool made, one JSON line per event with the worker's pid, in the file ``JODI_TEST_SPY`` names."""

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
