"""Orthonormal Hadamard matrices and their fast application.

Sizes: ``m * 2**k`` where ``m`` is 1, 2, or a Paley size (``q + 1`` for a prime power
``q ≡ 3 (mod 4)``, ``2 (q + 1)`` for a prime power ``q ≡ 1 (mod 4)``). That covers
every Llama-family width: 12, 20, 28, 36, 40, 44, 52, 60, ... times a power of two
(Llama 3.2 3B hidden 3072 = 12·256, Llama 3 8B intermediate 14336 = 28·512).

Convention: ``H`` is returned orthonormal (``H Hᵀ = I``) and applied to row vectors,
``y = x @ H``. For ``H = kron(A, B)`` this is ``Y = Aᵀ X B`` with ``X = x.view(m, 2**k)``.

Written by hand because no maintained Python library ships Paley-construction Hadamard
matrices (scipy.linalg.hadamard covers powers of two only).
"""

from __future__ import annotations

import functools
import math

import torch

from spinquant.errors import SpinQuantError


def _prime_power(q: int) -> tuple[int, int] | None:
    """Return (p, n) with q == p**n for a prime p, or None."""
    if q < 2:
        return None
    for p in range(2, int(math.isqrt(q)) + 1):
        if q % p == 0:
            n, r = 0, q
            while r % p == 0:
                r //= p
                n += 1
            return (p, n) if r == 1 else None
    return (q, 1)


class _GaloisField:
    """GF(p**n), elements coded as integers whose base-p digits are polynomial coefficients."""

    def __init__(self, p: int, n: int) -> None:
        self.p, self.n, self.q = p, n, p**n
        self.modulus = self._irreducible() if n > 1 else None

    def _digits(self, a: int) -> list[int]:
        return [(a // self.p**i) % self.p for i in range(self.n)]

    def _code(self, d: list[int]) -> int:
        return sum((c % self.p) * self.p**i for i, c in enumerate(d))

    def sub(self, a: int, b: int) -> int:
        if self.n == 1:
            return (a - b) % self.p
        return self._code([x - y for x, y in zip(self._digits(a), self._digits(b))])

    def _mul_mod(self, a: list[int], b: list[int], modulus: list[int]) -> list[int]:
        prod = [0] * (2 * self.n - 1)
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                prod[i + j] = (prod[i + j] + x * y) % self.p
        # reduce by the monic modulus (coefficients low to high, length n + 1)
        for deg in range(len(prod) - 1, self.n - 1, -1):
            c = prod[deg]
            if c:
                for i in range(self.n + 1):
                    prod[deg - self.n + i] = (prod[deg - self.n + i] - c * modulus[i]) % self.p
        return prod[: self.n]

    def _irreducible(self) -> list[int]:
        # a monic degree-n polynomial is irreducible iff the ring it defines has no zero divisors
        for low in range(self.p**self.n):
            modulus = self._digits(low) + [1]
            elems = [self._digits(a) for a in range(1, self.q)]
            if all(any(self._mul_mod(x, y, modulus)) for x in elems for y in elems):
                return modulus
        raise AssertionError(f"no irreducible polynomial of degree {self.n} over GF({self.p})")

    def mul(self, a: int, b: int) -> int:
        if self.n == 1:
            return (a * b) % self.p
        return self._code(self._mul_mod(self._digits(a), self._digits(b), self.modulus))

    def quadratic_character(self) -> list[int]:
        """chi[a] for every element a: 0 for a == 0, +1 for a non-zero square, -1 otherwise."""
        squares = {self.mul(x, x) for x in range(1, self.q)}
        return [0] + [1 if a in squares else -1 for a in range(1, self.q)]


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = chi(j - i) over GF(q), as a (q, q) int64 tensor."""
    p, n = _prime_power(q)  # type: ignore[misc]
    field = _GaloisField(p, n)
    chi = field.quadratic_character()
    return torch.tensor([[chi[field.sub(j, i)] for j in range(q)] for i in range(q)], dtype=torch.int64)


def _paley_base(m: int) -> torch.Tensor | None:
    """An (unnormalised, ±1) Hadamard matrix of size m by Paley I or II, or None."""
    if m % 4:
        return None
    q = m - 1
    pp = _prime_power(q)
    if pp and q % 4 == 3:  # Paley I: H = I + [[0, 1ᵀ], [-1, Q]]
        s = torch.zeros(m, m, dtype=torch.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(m, dtype=torch.int64) + s
    q = m // 2 - 1
    pp = _prime_power(q)
    if pp and q % 4 == 1:  # Paley II from the symmetric conference matrix C
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        c[0, 1:] = 1
        c[1:, 0] = 1
        c[1:, 1:] = _jacobsthal(q)
        on_entry = torch.tensor([[1, 1], [1, -1]])
        on_zero = torch.tensor([[1, -1], [-1, -1]])
        return torch.kron(c, on_entry) + torch.kron(torch.eye(q + 1, dtype=torch.int64), on_zero)
    return None


def hadamard_factors(n: int) -> tuple[int, int] | None:
    """(m, 2**k) with n == m * 2**k and a known size-m Hadamard matrix, largest 2**k first; None if there is none."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or _paley_base(m) is not None:
            return m, 1 << j
    return None


def is_supported_size(n: int) -> bool:
    """True if :func:`hadamard_matrix` can build an ``n x n`` Hadamard matrix."""
    return hadamard_factors(n) is not None


def executorch_computes(n: int) -> bool:
    """True if ExecuTorch's online ``fast_hadamard_transform`` (the R4 of ``--use_spin_quant native``) computes the
    orthonormal n x n Hadamard: powers of two only (with executorch 1.5.1, 12 x 128 aborts and 28 x 128 runs
    unnormalised: ../shared/notes/executorch-format.md)."""
    return n > 0 and n & (n - 1) == 0


def _unsupported(n: int, what: str) -> SpinQuantError:
    return SpinQuantError(
        f"no Hadamard matrix of size {n} (needed for {what}): supported sizes are m*2^k with m = 1 or a "
        f"Paley size (12, 20, 28, 36, 44, 52, 60, ...); a Hadamard matrix of size n exists only for "
        f"n = 1, 2 or a multiple of 4. Use a model whose width has such a factorisation, or disable that rotation."
    )


@functools.lru_cache(maxsize=32)
def _base_matrix(m: int) -> torch.Tensor:
    base = torch.ones(1, 1, dtype=torch.int64) if m == 1 else _paley_base(m)
    assert base is not None
    gram = base @ base.T
    assert torch.equal(gram, m * torch.eye(m, dtype=torch.int64)), f"construction of size {m} is not Hadamard"
    return base.to(torch.float64)


def sylvester(n: int) -> torch.Tensor:
    """The unnormalised Sylvester Hadamard matrix of size n = 2**k (natural order, symmetric), float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_matrix(n: int, what: str = "a rotation") -> torch.Tensor:
    """Orthonormal (n, n) Hadamard matrix in float64: kron(Paley_m, Sylvester_2^k) / sqrt(n).

    For n a power of two this is exactly ExecuTorch's ``fast_hadamard_transform`` matrix.
    Raises SpinQuantError naming n (and ``what`` needs it) when no construction is known.
    """
    split = hadamard_factors(n)
    if split is None:
        raise _unsupported(n, what)
    m, p2 = split
    return torch.kron(_base_matrix(m), sylvester(p2)) / math.sqrt(n)


def random_hadamard_matrix(n: int, seed: int, what: str = "a rotation") -> torch.Tensor:
    """Q = D @ H in float64: a seeded random ±1 diagonal D (signs of the rows) times orthonormal H."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=gen, dtype=torch.int64).to(torch.float64) * 2 - 1
    return signs[:, None] * hadamard_matrix(n, what)


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """x @ Sylvester(n) along the last dim (unnormalised), n a power of two, by butterflies."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        x = torch.stack([a + b, a - b], dim=-2).reshape(*lead, n)
        h *= 2
    return x


def apply_hadamard(x: torch.Tensor, n: int | None = None) -> torch.Tensor:
    """x @ hadamard_matrix(n) along the last dim, in O(n (log n + m)) per row, dtype preserved."""
    n = x.shape[-1] if n is None else n
    split = hadamard_factors(n)
    if split is None:
        raise _unsupported(n, "an online Hadamard transform")
    m, p2 = split
    lead = x.shape[:-1]
    y = _fwht(x.reshape(*lead, m, p2))
    if m > 1:
        base = _base_matrix(m).to(dtype=x.dtype, device=x.device)
        y = torch.einsum("ji,...jt->...it", base, y)
    return (y / math.sqrt(n)).reshape(*lead, n)


class OnlineHadamard(torch.nn.Module):
    """Applies ``x -> x @ H_n`` to the last dimension at run time (R4 before down_proj, R3 on Q/K)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        if not is_supported_size(n):
            raise _unsupported(n, "an online Hadamard transform")
        self.n = n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_hadamard(x, self.n)

    def extra_repr(self) -> str:
        return f"n={self.n}"


class HadamardInputLinear(torch.nn.Linear):
    """nn.Linear whose input is first rotated online: ``y = (x @ H_n) @ W.T``. Same state-dict keys as nn.Linear."""

    @classmethod
    def wrap(cls, linear: torch.nn.Linear) -> "HadamardInputLinear":
        new = cls.__new__(cls)
        torch.nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight, new.bias = linear.weight, linear.bias
        new.input_rotation = OnlineHadamard(linear.in_features)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_rotation(x))
