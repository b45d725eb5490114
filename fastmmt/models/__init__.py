"""Re-ID networks: torchvision-compatible ResNets / IBN-ResNet-50a with MMT's BN-neck head."""
from fastmmt.models.official import (NotOfficialCheckpointError, OfficialCheckpoint, convert_official_state_dict,
                                     is_official_checkpoint, load_official_model, load_official_weights,
                                     official_checkpoint_from, read_official_checkpoint)
from fastmmt.models.pretrained import LoadReport, load_backbone_weights, read_state_dict
from fastmmt.models.reid import ReIDNet, build_model
from fastmmt.models.resnet import ARCHS, IBN, BasicBlock, Bottleneck, ResNet, build_backbone

__all__ = [
    "ARCHS", "IBN", "BasicBlock", "Bottleneck", "LoadReport", "NotOfficialCheckpointError", "OfficialCheckpoint",
    "ReIDNet", "ResNet", "build_backbone", "build_model", "convert_official_state_dict", "is_official_checkpoint",
    "load_backbone_weights", "load_official_model", "load_official_weights", "official_checkpoint_from",
    "read_official_checkpoint", "read_state_dict",
]
