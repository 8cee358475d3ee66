"""CIFAR ResNet-20 / ResNet-56 (He et al. 2016, section 4.2) with option-A shortcuts.

The parameter names match the pretrained files of akamaster/pytorch_resnet_cifar10
(``resnet20-12fca82f.th``, ``resnet56-4bfd9763.th``: ``module.conv1.weight``,
``module.layer1.0.conv1.weight``, ..., ``module.linear.weight``), so :func:`load_cifar_resnet_weights`
loads them directly (the ``module.`` prefix of ``DataParallel`` is stripped).

Input normalization: those weights were trained on inputs normalized with the **ImageNet**
mean/std (``Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])`` in akamaster's
``trainer.py``), not the CIFAR statistics. The streams of this library normalize CIFAR with the
CIFAR mean/std, so the network takes ``input_mean`` / ``input_std`` (what the data it receives was
normalized with; default: the CIFAR-10 statistics of ``datamodules.cifar``) and re-normalizes its
input to the statistics the weights expect (``weights_mean`` / ``weights_std``, default ImageNet).
The re-normalization is a fixed per-channel affine map held in non-persistent buffers, so the state
dict keys are exactly those of the pretrained files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: statistics the akamaster CIFAR ResNet weights were trained with (ImageNet's)
AKAMASTER_MEAN, AKAMASTER_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: statistics of datamodules.cifar (the CIFAR-10 training pixels)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

#: blocks per stage of each depth (depth = 6 n + 2)
DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class ShortcutA(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the new channels (no parameters)."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = ShortcutA(planes) if stride != 1 or in_planes != planes else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 images: 16-32-64 channels, global average pooling, ``linear`` head.

    Args:
        depth: 20, 32, 44, 56 or 110.
        num_classes: outputs of the ``linear`` head (the pretrained heads have 10).
        input_mean / input_std: per-channel statistics the incoming images were normalized with.
        weights_mean / weights_std: statistics the network's weights expect (module docstring).
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        input_mean: Sequence[float] = CIFAR10_MEAN,
        input_std: Sequence[float] = CIFAR10_STD,
        weights_mean: Sequence[float] = AKAMASTER_MEAN,
        weights_std: Sequence[float] = AKAMASTER_STD,
    ) -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)} (6n+2), got {depth}")
        n = DEPTHS[depth]
        # x_weights = (x_in * s_in + m_in - m_w) / s_w = x_in * scale + shift
        s_in, m_in = torch.tensor(input_std), torch.tensor(input_mean)
        s_w, m_w = torch.tensor(weights_std), torch.tensor(weights_mean)
        self.register_buffer("in_scale", (s_in / s_w).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", ((m_in - m_w) / s_w).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(BasicBlock(planes_in, planes, s))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        self.num_features = 64
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled 64-d features ``(batch, 64)``."""
        if x.shape[1] != 3:
            raise ValueError(f"CifarResNet takes RGB images (batch, 3, H, W), got shape {tuple(x.shape)}")
        x = x * self.in_scale.to(x.dtype) + self.in_shift.to(x.dtype)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return out.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.forward_features(x))


def load_cifar_resnet_weights(model: CifarResNet, path: str | Path, load_head: bool | None = None) -> list[str]:
    """Loads an akamaster checkpoint (``{'best_prec1', 'state_dict'}`` with ``module.`` keys) into ``model``.

    The head is loaded when its shape matches (``load_head=None``), always (``True``: a shape
    mismatch raises) or never (``False``). BatchNorm's ``num_batches_tracked`` counters are absent
    from these old files and stay at zero. Returns the names of the parameters and buffers that
    were not loaded. Raises with the mismatching names when the file belongs to another depth.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no CIFAR ResNet weights at {path} (e.g. ../shared/data/resnet20-12fca82f.th)")
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    raw = ckpt["state_dict"] if isinstance(ckpt, dict) and "state_dict" in ckpt else ckpt
    state = {k.removeprefix("module."): v for k, v in raw.items()}
    own = model.state_dict()
    head_keys = [k for k in state if k.startswith("linear.")]
    head_fits = all(k in own and own[k].shape == state[k].shape for k in head_keys)
    if load_head is False or (load_head is None and not head_fits):
        for k in head_keys:
            state.pop(k)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
    if unexpected or wrong:
        raise ValueError(
            f"{path.name} does not fit this CifarResNet (depth from its blocks: "
            f"{_depth_of(state)}, model depth: {_depth_of(own)}): unexpected keys {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}"
        )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    core_missing = [k for k in missing if not k.startswith("linear.")]
    if core_missing:
        raise ValueError(f"{path.name} lacks parameters of this CifarResNet: {core_missing[:5]}")
    return missing


def _depth_of(state: dict[str, Tensor]) -> int:
    blocks = {k.split(".")[1] for k in state if k.startswith("layer1.")}
    return 6 * len(blocks) + 2


def cifar_resnet(
    depth: int = 20,
    num_classes: int = 10,
    weights: str | None = None,
    input_mean: Sequence[float] = CIFAR10_MEAN,
    input_std: Sequence[float] = CIFAR10_STD,
) -> CifarResNet:
    """A :class:`CifarResNet`, with pretrained ``weights`` (a path) loaded when given (head included
    when ``num_classes`` matches the file's 10 outputs)."""
    model = CifarResNet(depth, num_classes, input_mean=input_mean, input_std=input_std)
    if weights is not None:
        load_cifar_resnet_weights(model, weights)
    return model
