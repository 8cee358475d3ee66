"""Backbones and the generic ``ContinualClassifier`` LightningModule.

``backbone`` is a string: ``"small_cnn"`` or ``"mlp"`` (tests, small streams), ``"timm:<name>"``
(any timm model, ``pretrained=False`` by default here), ``"hf:<name>"`` (a Hugging Face sequence
classifier from a local folder or an offline model name such as ``hf:all-MiniLM-L6-v2``, see
:mod:`cl_plugins.offline`), ``"hf-config"`` with ``hf_config`` (a model built from a config dict,
for tests), ``"resnet18"`` (the reduced-stem ResNet-18 of the CL papers' CIFAR tables; ``nf`` sets
its width), ``"cifar_resnet20"`` / ``"cifar_resnet56"`` (optionally with the pretrained CIFAR-10
weights file, e.g. ``weights: data:resnet20-12fca82f.th``) or ``"efficientnet_lite0"``
(ImageNet-pretrained, from the local weights package).
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from cl_plugins.mixins import ContinualClassificationMixin


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm, global average pooling and a linear head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(2 * width, num_classes)
        self.num_features = 2 * width

    def forward_features(self, x: Tensor) -> Tensor:
        """Pooled features (batch, num_features)."""
        x = self.pool(torch.relu(self.bn1(self.conv1(x))))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return x.mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class MLP(nn.Module):
    """Flatten, hidden layers with ReLU (and dropout when ``dropout > 0``), linear head.

    ``init``: ``"default"`` keeps PyTorch's ``nn.Linear`` initialization; ``"xavier"`` draws every
    weight Glorot-uniform and zeroes every bias, as mammoth's ``MNISTMLP`` (the DER paper's Seq-MNIST
    network), so that its published figures can be reproduced.
    """

    def __init__(
        self, input_dim: int, num_classes: int = 10, hidden: int = 256, depth: int = 2, dropout: float = 0.0,
        init: Literal["default", "xavier"] = "default",
    ) -> None:
        super().__init__()
        if init not in ("default", "xavier"):
            raise ValueError(f"MLP init must be 'default' (PyTorch's) or 'xavier' (mammoth's MNISTMLP), got {init!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        d = input_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)
        self.num_features = d
        if init == "xavier":
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Last hidden layer (batch, hidden)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))


class HFSequenceClassifier(nn.Module):
    """A Hugging Face sequence classifier fed with padded token-id tensors.

    Stream batches carry ``x`` as a LongTensor of token ids; the attention mask is
    ``x != pad_token_id``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        pad = getattr(model.config, "pad_token_id", None)
        self.pad_token_id = 0 if pad is None else int(pad)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(input_ids=x, attention_mask=(x != self.pad_token_id).long()).logits


def _timm_model(name: str, num_classes: int, in_channels: int, pretrained: bool, **kwargs: Any) -> nn.Module:
    import timm

    if pretrained and not kwargs.get("pretrained_cfg_overlay", {}).get("file"):
        raise ValueError(
            f"timm:{name} with pretrained=True would download weights, and downloads are off: build it with "
            "pretrained=False, or give a local weights file through backbone_kwargs "
            "{pretrained_cfg_overlay: {file: <path>}}"
        )
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else " See timm.list_models()."
        raise ValueError(f"unknown timm model '{name}'.{hint}")
    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_channels, **kwargs)


def _hf_model(path: str | None, num_classes: int, config: dict[str, Any] | None) -> nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if config is not None:
        cfg = dict(config)
        model_type = cfg.pop("model_type", "bert")
        hf_cfg = AutoConfig.for_model(model_type, num_labels=num_classes, **cfg)
        return HFSequenceClassifier(AutoModelForSequenceClassification.from_config(hf_cfg))
    from cl_plugins.offline import resolve_hf_model

    path = resolve_hf_model(path or "")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_classes, local_files_only=True)
    return HFSequenceClassifier(model)


def build_backbone(
    backbone: str,
    num_classes: int,
    in_channels: int = 1,
    input_shape: tuple[int, ...] = (1, 28, 28),
    pretrained: bool = False,
    hf_config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Builds the network named by ``backbone`` (see the module docstring)."""
    if backbone == "small_cnn":
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, **kwargs)
    if backbone == "mlp":
        return MLP(math.prod(input_shape), num_classes=num_classes, **kwargs)
    if backbone == "resnet18":
        from cl_plugins.resnet18 import ResNet18

        return ResNet18(num_classes=num_classes, in_channels=in_channels, **kwargs)
    if backbone in ("cifar_resnet20", "cifar_resnet56"):
        # CIFAR ResNet-20/56 (option-A shortcuts); backbone_kwargs: weights=<path or data:<file>>
        from cl_plugins.cifar_resnet import cifar_resnet
        from cl_plugins.offline import resolve_data_path

        if kwargs.get("weights") is not None:
            kwargs["weights"] = resolve_data_path(kwargs["weights"])
        return cifar_resnet(int(backbone.removeprefix("cifar_resnet")), num_classes=num_classes, **kwargs)
    if backbone == "efficientnet_lite0":
        # ImageNet-pretrained EfficientNet-Lite0 (offline); backbone_kwargs: weights, load_weights, dropout
        from cl_plugins.efficientnet_lite import EfficientNetLite

        return EfficientNetLite(num_classes, **kwargs)
    if backbone.startswith("timm:"):
        return _timm_model(backbone[5:], num_classes, in_channels, pretrained, **kwargs)
    if backbone == "hf-config":
        if hf_config is None:
            raise ValueError("backbone 'hf-config' needs hf_config (a transformers config as a dict)")
        return _hf_model(None, num_classes, hf_config)
    if backbone.startswith("hf:"):
        return _hf_model(backbone[3:], num_classes, None)
    raise ValueError(
        f"unknown backbone '{backbone}': use 'small_cnn', 'mlp', 'resnet18', 'cifar_resnet20', 'cifar_resnet56', "
        "'efficientnet_lite0', 'timm:<model name>', 'hf:<local folder or offline model name>' or 'hf-config' "
        "(with hf_config)"
    )


class ContinualClassifier(ContinualClassificationMixin, pl.LightningModule):
    """Any backbone as a stream classifier, with SGD or AdamW over the trainable parameters.

    ``configure_optimizers`` takes only parameters with ``requires_grad`` at the time it runs,
    i.e. after callbacks have frozen the backbone or injected modules in ``setup()``.
    ``train_on_seen_classes``: class-IL training's cross-entropy over the classes seen so far (mammoth's
    ``lwf.py``) instead of every output.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        input_shape: tuple[int, ...] = (1, 28, 28),
        pretrained: bool = False,
        hf_config: dict[str, Any] | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: str = "sgd",
        lr: float = 0.05,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        train_on_seen_classes: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_on_seen_classes = train_on_seen_classes
        if optimizer not in ("sgd", "adamw", "adam"):
            raise ValueError(f"optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        self.net = build_backbone(
            backbone, num_classes, in_channels=in_channels, input_shape=tuple(input_shape),
            pretrained=pretrained, hf_config=hf_config, **(backbone_kwargs or {}),
        )
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        self.check_num_outputs(self.num_classes)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters: check which callbacks froze it")
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        if hp.optimizer == "adam":
            return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
