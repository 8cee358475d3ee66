"""Run a Python script in a fresh interpreter (for DDP, which re-launches its script per rank)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Appended to every script: a process group left initialized at exit can abort the interpreter's teardown
# under Gloo (SIGABRT after the script's work is done), which would read as a failure of the test; the
# scripts end the way train.py does.
EPILOGUE = """

from train import shutdown_distributed as _shutdown_distributed
_shutdown_distributed()
"""


def run_script(code: str, tmp_path: Path, timeout: int = 600, args: list[str] | None = None) -> dict[str, Any]:
    """Writes ``code`` to ``tmp_path/script.py``, runs it from the repository root and returns the JSON
    object the script wrote to the path in ``$RESULT_PATH`` (written by rank zero).

    The script should build ``Trainer(accelerator="cpu", devices=2, strategy="ddp", ...)`` itself;
    Lightning re-runs it once per extra rank. Raises with the script's output on failure.
    """
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code) + EPILOGUE)
    result = tmp_path / "result.json"
    # the repository first, then whatever the caller had on PYTHONPATH (e.g. a --target site folder)
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, RESULT_PATH=str(result), PYTHONPATH=pythonpath, OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(script), *(args or [])], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(f"script failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    if not result.exists():
        raise AssertionError(f"script wrote no result:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())
