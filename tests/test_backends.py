"""Which backend runs a call: the names, the resolver and ``auto``.

Whether each backend computes the right answer is test_agreement.py's; what
only one backend has is in test_native.py and test_triton.py.
"""

from unittest import mock

import pytest
import torch

import pgs_kernels
from pgs_kernels import resolve_backend


def test_auto_is_the_operator_and_names_its_kernel():
    """"auto" runs the operator, the one per-device dispatch: native on CPU where
    it is built, Triton on CUDA where it imports, the reference anywhere else."""
    from pgs_kernels import op

    assert resolve_backend("auto", "cpu").name == ("native" if op.NATIVE_AVAILABLE else "reference")
    assert resolve_backend("auto", "cuda").name == ("triton" if op.TRITON_AVAILABLE else "reference")
    assert resolve_backend("auto", "xpu").name == "reference"
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 4)
    with mock.patch.object(op, "pgs_select_op", wraps=op.pgs_select_op) as operator:
        pgs_kernels.pgs_select(images, noise=noise, patch_size=16)
        assert operator.call_count == 1
        if "native" in pgs_kernels.available_backends("cpu"):
            pgs_kernels.pgs_select(images, noise=noise, patch_size=16, backend="native")
            assert operator.call_count == 2
        pgs_kernels.pgs_select(images, noise=noise, patch_size=16, backend="reference")  # the oracle, directly
        assert operator.call_count in (1, 2)


def test_resolver_names_backend_and_says_why():
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("gpu", "cpu")
    with pytest.raises(TypeError, match="backend must be a str"):
        resolve_backend(None, "cpu")
    with pytest.raises(ValueError, match="backend='native' is not available for meta tensors: needs CPU"):
        resolve_backend("native", "meta")
    assert resolve_backend("reference", "cpu").name == "reference"
