"""Launching a test worker on 2 CPU processes (gloo) with ``torch.distributed.run``: one place for the skip
marker, the free port and the environment every distributed test uses."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence

import pytest
import torch

gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch.distributed with the gloo backend is unavailable",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: Sequence[str], *, timeout: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2`` on 127.0.0.1 with a free port, running ``args`` (a
    script path and its arguments, or ``-m module ...``); one thread per process, offline, no RANK inherited;
    ``env`` adds to that environment. Returns the finished process (stdout / stderr captured as text)."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
            **(env or {})}  # fmt: skip
    full.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]  # fmt: skip
    return subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)


def teardown() -> None:
    """Leave the process group at the end of a worker, as the CLI does (:func:`safeft.cli.leave_process_group`: wait
    for every rank, then destroy it). A worker that exits with gloo still alive has aborted at interpreter shutdown
    ("terminate called without an active exception", SIGABRT) once in a while, on any rank, after all its work was
    written."""
    from safeft.cli import leave_process_group

    leave_process_group(wait=True)
