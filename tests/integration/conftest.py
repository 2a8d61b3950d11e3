from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.demo_task import write_task


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The demo's addition task (200 training rows, 8 held out) in a temporary directory."""
    out = tmp_path_factory.mktemp("task")
    write_task(out, train=200, held_out=8)
    return out
