"""Data layer: dataset records and loaders, synthetic domains, the P x K sampler, transforms and
the plain-torch input pipeline. See docs/data.md."""
from fastmmt.data.datasets import LOADERS, load_dataset, relabel
from fastmmt.data.image_io import load_image
from fastmmt.data.loaders import TorchTrainLoader, TrainBatch, build_test_loader
from fastmmt.data.records import DatasetError, ImageReadError, ImageRecord, ReIDDataset
from fastmmt.data.sampler import IdentitySampler
from fastmmt.data.synthetic import DomainStyle, generate_domains, generate_synthetic
from fastmmt.data.transforms import IMAGENET_MEAN, IMAGENET_STD, TestTransform, TrainTransform

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "LOADERS", "DatasetError", "DomainStyle", "IdentitySampler",
    "ImageReadError", "ImageRecord", "ReIDDataset", "TestTransform", "TorchTrainLoader", "TrainBatch",
    "TrainTransform", "build_test_loader", "generate_domains", "generate_synthetic", "load_dataset",
    "load_image", "relabel",
]

# DALI input pipelines and the backend switch (docs/pipelines.md). The backend-switching test
# loader is fastmmt.data.factory.build_test_loader (the name here stays the torch one).
from fastmmt.data.factory import build_train_loader, dali_available, resolve_data_backend  # noqa: E402

__all__ += ["build_train_loader", "dali_available", "resolve_data_backend"]
