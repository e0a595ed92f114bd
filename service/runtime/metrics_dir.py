"""The directory where every process of one md5-light writes its metric
samples. It must exist, and be in the environment, before prometheus_client
is first imported: run.py calls ``prepare`` first thing in the 'all' role,
and the worker processes it starts inherit the variable."""

from __future__ import annotations

import os
import shutil
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def prepare() -> str:
    path = os.environ.get(ENV)
    if path:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):  # samples of an earlier run
            os.unlink(os.path.join(path, name))
    else:
        path = tempfile.mkdtemp(prefix="md5light-metrics-")
        os.environ[ENV] = path
    return path


def remove(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)
