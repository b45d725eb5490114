"""Re-ID networks: torchvision-compatible ResNets / IBN-ResNet-50a with MMT's BN-neck head."""
from fastmmt.models.pretrained import LoadReport, load_backbone_weights, read_state_dict
from fastmmt.models.reid import ReIDNet, build_model
from fastmmt.models.resnet import ARCHS, IBN, BasicBlock, Bottleneck, ResNet, build_backbone

__all__ = [
    "ARCHS", "IBN", "BasicBlock", "Bottleneck", "LoadReport", "ReIDNet", "ResNet",
    "build_backbone", "build_model", "load_backbone_weights", "read_state_dict",
]
