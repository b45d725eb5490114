"""Data layer: dataset records and loaders, synthetic domains, the P x K sampler and batch planner,
the augmentation spec, transforms and the plain-torch input pipeline. See docs/data.md."""
from fastmmt.data.augment import AugmentSpec
from fastmmt.data.datasets import LOADERS, load_dataset, relabel
from fastmmt.data.image_io import load_image
from fastmmt.data.loaders import TorchTrainLoader, TrainBatch, build_torch_test_loader
from fastmmt.data.records import DatasetError, ImageReadError, ImageRecord, ReIDDataset
from fastmmt.data.sampler import BatchPlanner, IdentitySampler
from fastmmt.data.synthetic import DomainStyle, generate_domains, generate_synthetic
from fastmmt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LOADERS", "AugmentSpec", "BatchPlanner", "DatasetError", "DomainStyle",
    "IdentitySampler", "ImageReadError", "ImageRecord", "ReIDDataset", "TestTransform", "TorchTrainLoader", "TrainBatch",
    "TrainTransform", "build_torch_test_loader", "generate_domains", "generate_synthetic", "load_dataset",
    "load_image", "relabel",
]

# DALI input pipelines and the backend switch (docs/pipelines.md).
from fastmmt.data.factory import (  # noqa: E402
    build_test_loader,
    build_train_loader,
    dali_available,
    resolve_data_backend,
)

__all__ += ["build_test_loader", "build_train_loader", "dali_available", "resolve_data_backend"]
