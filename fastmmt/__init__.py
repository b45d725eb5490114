"""fastmmt: Mutual Mean-Teaching for domain-adaptive person re-ID, faithful and fast.

Layers (import direction): ``fastmmt.ops`` (fused ops, standalone) and ``fastmmt.safe_load``
(reading torch files without running code, standalone) ; ``fastmmt.data`` ->
``fastmmt.models`` -> ``fastmmt.train``, with ``fastmmt.cluster`` and ``fastmmt.evaluation``
beside; ``fastmmt.cli`` is a thin layer over the library.
"""
__version__ = "0.1.0"
