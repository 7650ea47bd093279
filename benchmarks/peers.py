"""The peer frameworks' own virtual environment: ``benchmarks/.peers/venv``, never a project dependency.

``peer_python()`` creates it on first use (with a progress line) and returns its interpreter; peer workloads run
as subprocesses of that interpreter and print one JSON object on their last line of output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path
from typing import Any

__all__ = ["PEER_PACKAGES", "peer_python", "run_peer"]

ROOT = Path(__file__).resolve().parent
PEERS_DIR = ROOT / ".peers"
VENV_DIR = PEERS_DIR / "venv"

PEER_PACKAGES = [
    "celery>=5.3",
    "dramatiq[rabbitmq]>=1.16",
    "taskiq>=0.11",
    "taskiq-aio-pika>=0.4",
    "faststream[rabbit,cli]>=0.5",
    "parsl>=2024.1",
    "dask[distributed]>=2024.1",
    "bytewax>=0.19",
    "taskiq-redis>=1.0",
    "aio-pika>=9.4",
    "numpy",
    "psutil",
]


def peer_python() -> Path:
    """The peers' interpreter, installing the venv and its packages the first time."""
    python = VENV_DIR / "bin" / "python"
    stamp = VENV_DIR / ".installed"
    wanted = "\n".join(PEER_PACKAGES)
    if stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"[peers] installing {len(PEER_PACKAGES)} peer packages into {VENV_DIR} (first run only)...", flush=True)
    if not python.exists():
        venv.create(VENV_DIR, with_pip=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    stamp.write_text(wanted)
    return python


def run_peer(script: Path, *args: str, timeout: float = 900.0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``script`` with the peers' interpreter; return the JSON object it printed last."""
    python = peer_python()
    environment = {**os.environ, **(env or {})}
    environment["PATH"] = f"{python.parent}{os.pathsep}{environment.get('PATH', '')}"  # parsl needs its bin
    result = subprocess.run(
        [str(python), str(script), *args], capture_output=True, text=True, timeout=timeout, env=environment
    )
    if result.returncode != 0:
        raise RuntimeError(f"peer script {script.name} failed:\n{result.stderr[-3000:]}")
    last = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not last:
        raise RuntimeError(f"peer script {script.name} printed no JSON:\n{result.stdout[-2000:]}")
    return dict(json.loads(last[-1]))


if __name__ == "__main__":
    print(peer_python())
    sys.exit(0)
