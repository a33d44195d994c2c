"""The hardware-target registry: one object per target, each complete and consistent with what the exporter accepts."""

from __future__ import annotations

import pytest

from spinquant.errors import SpinQuantError
from spinquant.pte import RUNTIME_FLAGS
from spinquant.quant.scheme import GROUP_SIZES
from spinquant.targets import DEFAULT_TARGET, EXPORTERS, TARGETS, Target, get_target


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_is_complete(name):
    t = get_target(name)
    assert t.name == name and t.exporter in EXPORTERS and t.description
    assert t.quantizes == (t.scheme is not None)
    if t.exporter == "executorch":  # the pre-quantized checkpoint: W4 groups ExecuTorch's loader accepts
        assert t.scheme is not None and t.scheme.w_bits == 4 and t.scheme.group in GROUP_SIZES
    if t.runtime is not None:  # a .pte is built here: export_llama knows the backend's flags
        assert t.runtime in RUNTIME_FLAGS and t.pte
    else:
        assert not t.pte


def test_the_runtime_decides_what_r4_can_be():
    t = get_target(DEFAULT_TARGET)
    assert t.name == "xnnpack-8da4w-g32" and t.scheme.group == 32 and t.pte
    assert t.computes_online_hadamard(2048) and not t.computes_online_hadamard(1536)  # ExecuTorch: powers of two
    assert get_target("qnn-float-rotated").computes_online_hadamard(1536)  # no ExecuTorch runtime: our Hadamard sizes decide


def test_an_unknown_target_names_the_choices():
    with pytest.raises(SpinQuantError, match="unknown target 'tpu'.*xnnpack-8da4w-g32"):
        get_target("tpu")
    assert isinstance(TARGETS[DEFAULT_TARGET], Target)
