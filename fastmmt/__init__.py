"""fastmmt: Mutual Mean-Teaching for domain-adaptive person re-ID, faithful and fast.

Layers (import direction): ``fastmmt.ops`` (fused ops, standalone) and ``fastmmt.safe_load``
(reading torch files without running code, standalone) ; ``fastmmt.data`` ->
``fastmmt.models`` -> ``fastmmt.train``, with ``fastmmt.cluster`` and ``fastmmt.evaluation``
beside; ``fastmmt.cli`` is a thin layer over the library.
"""
__version__ = "0.1.0"

import os as _os

# setup.py installs kernels/ (beside this package) as fastmmt.kernels. Run from a source checkout
# without installing (``scripts/gpu_check.sh --system`` on a machine with no package registry),
# the checkout's root joins this package's search path so ``fastmmt.kernels`` is that folder.
_root = _os.path.dirname(__path__[0])
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)
del _os, _root
