import math

import pytest
import scipy.linalg
import torch

from spinquant.errors import SpinQuantError
from spinquant.hadamard import OnlineHadamard, apply_hadamard, hadamard_matrix, is_supported_size, random_hadamard_matrix

BASES = [1, 12, 20, 28, 36, 40, 52, 60]
SIZES = sorted({m * 2**k for m in BASES for k in range(15) if m * 2**k <= 16384})


def _rows(n: int, count: int = 48) -> torch.Tensor:
    """All rows for small n; a seeded sample of rows of H Hᵀ for big n (the full product is n³)."""
    if n <= 1024:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(n))[:count]


@pytest.mark.parametrize("n", SIZES)
def test_orthonormal_every_supported_size(n):
    h = hadamard_matrix(n)
    assert h.shape == (n, n)
    idx = _rows(n)
    sample = h[idx]
    # entries are exactly ±1/sqrt(n): a true Hadamard matrix, not just any orthogonal one
    assert torch.allclose(sample.abs(), torch.full_like(sample, 1 / math.sqrt(n)))
    eye_rows = torch.zeros(len(idx), n, dtype=h.dtype)
    eye_rows[torch.arange(len(idx)), idx] = 1.0
    assert (sample @ h.T - eye_rows).abs().max().item() < 1e-6


@pytest.mark.parametrize("n", [2, 16, 256, 1024, 8192])
def test_power_of_two_is_sylvester_natural_order(n):
    # ExecuTorch's fast_hadamard_transform uses this matrix: our R4 must be it exactly
    expected = torch.from_numpy(scipy.linalg.hadamard(n)).double() / math.sqrt(n)
    assert torch.equal(hadamard_matrix(n), expected)


@pytest.mark.parametrize("n", [12, 64, 384, 1024, 3072, 28 * 16, 52 * 4, 100])
def test_fast_apply_matches_matrix(n):
    x = torch.randn(3, 5, n, dtype=torch.float64)
    assert torch.allclose(apply_hadamard(x), x @ hadamard_matrix(n), atol=1e-12)
    x32 = x.float()
    assert OnlineHadamard(n)(x32).dtype == torch.float32


@pytest.mark.parametrize("n", [3, 6, 5, 92, 116])
def test_unsupported_size_error_names_the_size(n):
    assert not is_supported_size(n)
    with pytest.raises(SpinQuantError, match=rf"size {n}\b"):
        hadamard_matrix(n, "R1 (hidden size)")
    with pytest.raises(SpinQuantError, match=rf"size {n}\b"):
        OnlineHadamard(n)


def test_three_times_power_of_two_from_four_up_is_supported():
    # 3*2^k = 12*2^(k-2) for k >= 2 (Llama 3.2 3B: 3072 = 3*1024), only 3 and 6 have no Hadamard matrix
    for k in range(2, 13):
        assert is_supported_size(3 * 2**k)


def test_random_hadamard_seeded_and_orthogonal():
    a, b, c = (random_hadamard_matrix(384, s) for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a @ a.T - torch.eye(384, dtype=torch.float64)).abs().max() < 1e-12
    # D @ H: rows of H with random signs
    h = hadamard_matrix(384)
    assert torch.equal((a / h).abs(), torch.ones_like(h)) and ((a / h)[:, :1] == (a / h)).all()


def test_executorch_computes_powers_of_two_only():
    """ExecuTorch's online fast_hadamard_transform: Llama 3.2's 8192 yes; SmolLM2's 1536 (aborts there) and
    28 x 128 (runs, unnormalised) no, though spinquant itself builds all three."""
    from spinquant.hadamard import executorch_computes

    assert executorch_computes(8192) and executorch_computes(64)
    for n in (1536, 3584, 96, 0):
        assert not executorch_computes(n)
    assert all(is_supported_size(n) for n in (8192, 1536, 3584, 96))
