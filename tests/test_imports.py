"""``import callbacks`` stays light: Avalanche, and any heavy optional package that ``import lightning.pytorch``
does not already import, are imported only when a stream or a backbone that needs them is built."""

from __future__ import annotations

import json
import subprocess
import sys

from tests._subprocess import ROOT

#: packages a callback does not need; the streams (Avalanche), backbones (timm, transformers, peft), plots and
#: data (matplotlib, torchvision, sklearn, pandas) import them on use
HEAVY = ("avalanche", "transformers", "timm", "peft", "matplotlib", "torchvision", "sklearn", "pandas")

CODE = """
import json, sys
import lightning.pytorch
before = set(sys.modules)
import callbacks, cl_plugins, datamodules
new = sorted({m.split('.')[0] for m in set(sys.modules) - before})
print(json.dumps({"new": new, "avalanche": "avalanche" in sys.modules}))
"""


def _run(code: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_callbacks_imports_no_heavy_package():
    result = _run(CODE)
    assert not result["avalanche"], "import callbacks imported Avalanche"
    heavy = sorted(set(result["new"]) & set(HEAVY))
    assert not heavy, f"import callbacks imported {heavy} beyond what lightning.pytorch imports"


def test_streams_are_importable_by_name_on_first_use():
    result = _run("""
import json, sys
import datamodules
from datamodules import SplitMNIST, StreamConfigError
names = sorted(n for n in datamodules.__all__ if getattr(datamodules, n) is None)
print(json.dumps({"avalanche": "avalanche" in sys.modules, "missing": names,
                  "dir": set(datamodules.__all__) <= set(dir(datamodules))}))
""")
    assert result == {"avalanche": True, "missing": [], "dir": True}
