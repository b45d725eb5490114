"""Run one script of the user's copy of the official MMT code (github.com/yxgeee/MMT) unchanged,
under a current PyTorch, on a CPU or a GPU.

    python bench/fidelity/official_runner.py OFFICIAL_ROOT examples/mmt_train_kmeans.py [its args]

Nothing of the official code is copied or edited: this puts ``OFFICIAL_ROOT`` on ``sys.path``,
applies the run-time shims below, and executes the script as ``__main__``. Each shim exists
because the code as published does not start otherwise under torch 2.13 / scikit-learn >= 1.4
(or without a GPU); each keeps what the code did when it ran:

1. ``torchvision._meta_registrations`` is replaced by an empty module when torchvision's compiled
   operators cannot be registered (a CUDA torchvision wheel beside a CPU torch): the official code
   uses only torchvision's Python models and transforms, never its C++ operators.
2. ``sklearn.cluster.KMeans`` is wrapped: ``n_jobs`` (removed in scikit-learn 1.0) is dropped and
   ``n_init`` defaults to 10, the value the official code ran with (scikit-learn >= 1.4 defaults
   to ``"auto"``, one k-means++ run).
3. ``torchvision.models.resnet*`` never download: ``pretrained=True`` loads the local ImageNet file
   named by ``FIDELITY_IMAGENET`` (torchvision format), or, with ``FIDELITY_IMAGENET=none``, keeps
   torchvision's random initialisation (the synthetic harness trains from scratch, both sides).
4. Without CUDA, ``Tensor.cuda()`` and ``Module.cuda()`` return the object unchanged (the code
   calls them unconditionally); ``nn.DataParallel`` with no GPU already calls the module directly.
5. ``torch.load`` (weights-only by default since torch 2.6) is allowed the NumPy scalar types the
   official checkpoints hold (``best_mAP``); it stays a weights-only load.
6. ``FIDELITY_EVAL_LOG=PATH``: every ``Evaluator.evaluate`` result (mAP, and rank-1 when the call
   asks for the CMC) is appended to PATH as a JSON line at full precision (the log prints 0.1%).
"""
from __future__ import annotations

import json
import os
import runpy
import sys
import types


def _shim_torchvision() -> None:
    import torch  # noqa: F401
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:  # compiled ops of another torch build
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401


def _shim_pretrained() -> None:
    import torch
    import torchvision.models as tvm

    source = os.environ.get("FIDELITY_IMAGENET", "none")

    def wrap(factory):
        def build(pretrained: bool = False, **kw):
            net = factory(weights=None, **kw)
            if pretrained and source != "none":
                net.load_state_dict(torch.load(source, map_location="cpu"))
            return net
        return build

    for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"):
        setattr(tvm, name, wrap(getattr(tvm, name)))


def _shim_kmeans() -> None:
    import sklearn.cluster

    original = sklearn.cluster.KMeans

    def KMeans(*args, n_jobs=None, n_init=10, **kw):  # noqa: N802 - stands in for the class
        return original(*args, n_init=n_init, **kw)

    sklearn.cluster.KMeans = KMeans


def _shim_cuda() -> None:
    import torch
    from torch import nn

    if torch.cuda.is_available():
        return
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self


def _shim_checkpoints() -> None:
    import numpy as np
    import torch

    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    torch.serialization.add_safe_globals([scalar, np.dtype, *{type(np.dtype(t)) for t in ("f8", "f4", "i8")}])


def _record_evaluations(path: str) -> None:
    from mmt import evaluators

    evaluate = evaluators.Evaluator.evaluate

    def recorded(self, *args, **kwargs):
        out = evaluate(self, *args, **kwargs)
        rec = {"rank1": float(out[0]), "mAP": float(out[1])} if isinstance(out, tuple) else {"mAP": float(out)}
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        return out

    evaluators.Evaluator.evaluate = recorded


def setup(root: str) -> None:
    """Make ``import mmt`` work from the official copy at ``root`` with every shim applied."""
    if not os.path.isfile(os.path.join(root, "mmt", "trainers.py")):
        raise SystemExit(f"{root} does not look like the official MMT code (mmt/trainers.py expected)")
    sys.path.insert(0, root)
    _shim_torchvision()
    _shim_pretrained()  # before `import mmt`: its ResNet keeps the factory functions it saw
    _shim_kmeans()
    _shim_cuda()
    _shim_checkpoints()
    if os.environ.get("FIDELITY_EVAL_LOG"):
        _record_evaluations(os.environ["FIDELITY_EVAL_LOG"])


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: official_runner.py OFFICIAL_ROOT SCRIPT [script args]")
    root, script = os.path.abspath(argv[0]), argv[1]
    path = script if os.path.isabs(script) else os.path.join(root, script)
    if not os.path.isfile(path):
        raise SystemExit(f"{path} not found")
    setup(root)
    sys.argv = [path, *argv[2:]]
    runpy.run_path(path, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
