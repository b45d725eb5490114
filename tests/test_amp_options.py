"""fp16 training is refused with a clear error (no gradient scaler); bf16 and None are accepted."""
import pytest
import torch

from fastmmt.cli.config import ConfigError, load_options
from fastmmt.train.runtime import autocast


def test_fp16_refused_when_options_are_read():
    with pytest.raises(ConfigError, match=r"run\.amp: amp='fp16' is not supported: .*gradient scaling.*bf16"):
        load_options(None, ["run.amp=fp16"])
    assert load_options(None, ["run.amp=bf16"]).run.amp == "bf16"
    with pytest.raises(ConfigError, match=r"run\.amp = 'fp8' is not allowed"):
        load_options(None, ["run.amp=fp8"])


def test_fp16_refused_by_the_library_autocast_too():
    """Options built in code skip the config checks: the trainers' autocast refuses fp16 too."""
    for device in ("cpu", "cuda"):
        with pytest.raises(ValueError, match="gradient scaling"):
            autocast(torch.device(device), "fp16")
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")
