"""Where a result came from: the commit, whether the tree was dirty, and the GPUs.

Pure Python (no torch), so the runner, the report and the pytest plugin can read it
without initialising anything. On a machine without git (a copy of the working tree),
``FASTVIDEO_COMMIT`` / ``FASTVIDEO_DIRTY`` say what git would have said.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def git_state() -> dict[str, Any]:
    """{"commit": hash or None, "dirty": bool or None}; the environment variables win."""
    commit = os.environ.get("FASTVIDEO_COMMIT") or None
    dirty_env = os.environ.get("FASTVIDEO_DIRTY")
    dirty: bool | None = None
    if dirty_env is not None:
        dirty = dirty_env.strip().lower() in ("1", "true", "yes", "dirty")
    if commit is None:
        head = _git("rev-parse", "HEAD")
        commit = head.strip() if head else None
    if dirty is None and commit is not None:
        status = _git("status", "--porcelain")
        dirty = None if status is None else bool(status.strip())
    return {"commit": commit, "dirty": dirty}


def gpu_names() -> list[str]:
    """Names of the GPUs this process may use, from nvidia-smi (never a CUDA context);
    ``CUDA_VISIBLE_DEVICES`` (indices) narrows the list. Empty without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    names = [line.strip() for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        picks = [v.strip() for v in visible.split(",") if v.strip()]
        if all(p.isdigit() for p in picks):
            names = [names[int(p)] for p in picks if int(p) < len(names)]
    return names


def gpu_kind(names: list[str] | None = None) -> str:
    """Short name of the machine for result file names: "h200", "h200x4", "cpu"."""
    names = gpu_names() if names is None else names
    if not names:
        return "cpu"
    words = [w for w in names[0].split() if w.lower() not in ("nvidia", "geforce", "tesla")]
    base = re.sub(r"[^a-z0-9]", "", (words[0] if words else "gpu").split("-")[0].lower())
    return base if len(names) == 1 else f"{base}x{len(names)}"
