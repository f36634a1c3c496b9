"""Geometric algebras G(p, q, r) generated from their metric signature, for GATr.

Nothing here is typed in by hand: every table follows from the list of squares of the basis
vectors (``signature``), with basis blades indexed by bitmasks (blade ``e_A`` has index
A = Σ_{i in A} 2^i, so blade 0 is the scalar 1 and blade 2^D-1 the pseudoscalar I):

    e_A e_B = σ(A, B) · m(A ∩ B) · e_{A xor B}

σ(A, B) = (-1)^(number of transpositions that sort the concatenated basis vectors), m(S) the
product of the squares of the basis vectors in S (0 when S holds a null vector). The outer
product keeps the terms with A ∩ B = ∅. The join (regressive product) is
a ∨ b = J⁻¹(J(a) ∧ J(b)) with the right complement J(e_A) = σ(A, ~A) e_{~A} (e_A ∧ J(e_A) = I),
which needs no metric (it works in the degenerate projective algebra).

The three algebras of GATr (de Haan, Cohen, Brehmer, "Euclidean, Projective, Conformal:
Choosing a Geometric Algebra for Equivariant Transformers", AISTATS 2024) and how an atom at x
(Å, relative to its structure's centroid) enters:

    euclidean   G(3,0,0)  e1,e2,e3 (squares +1)             x = x1 e1 + x2 e2 + x3 e3 (vector)
                group O(3)
    projective  G(3,0,1)  e0 (square 0), e1,e2,e3 (+1)      P(x) = (e1 - x1 e0) ∧ (e2 - x2 e0) ∧ (e3 - x3 e0)
                group E(3)                                   (trivector: meet of three planes)
    conformal   G(4,1)    e1,e2,e3,e4 (+1), e5 (-1)          X = e_o + x + |x|²/2 e_∞,
                group E(3) (the versors that fix e_∞)         e_o = (e5 - e4)/2, e_∞ = e4 + e5

The group acts on a multivector x through versors u (products of unit reflection vectors
v = n·e + δ f, with n a unit vector of R³ and f the group's fixed null vector: e0 in the
projective algebra, e_∞ in the conformal one, none in the Euclidean one) by the twisted
sandwich ρ_u(x) = u x u⁻¹ for even u and u x̂ u⁻¹ for odd u (x̂ the grade involution): an
algebra automorphism that keeps grades. The plane v = n·e + δ f reflects points x to
x - 2(n·x + δ)n (projective) resp. x - 2(n·x - δ)n (conformal); tests check these meanings.

Equivariant linear maps (:func:`equivariant_linear_basis`): the grade projections ⟨x⟩_k and,
where the group fixes a null vector f, the maps ⟨f ⟨x⟩_k⟩_l and ⟨f ⟨f ⟨x⟩_k⟩_l⟩_m (left
multiplication by f between grade projections), reduced to a linearly independent set. Each
commutes with ρ_u because ρ_u is an automorphism that fixes f and keeps grades; the tests also
show that they span every equivariant linear map (the numerical commutant of random versors).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

import numpy as np

#: algebra name -> squares of the basis vectors, in basis order
SIGNATURES = {
    "euclidean": (1.0, 1.0, 1.0),
    "projective": (0.0, 1.0, 1.0, 1.0),  # e0, e1, e2, e3
    "conformal": (1.0, 1.0, 1.0, 1.0, -1.0),  # e1, e2, e3, e4 (= e+), e5 (= e-)
}
ALGEBRAS = tuple(SIGNATURES)


def reorder_sign(a: int, b: int) -> int:
    """σ(A, B): the sign of sorting the basis vectors of e_A e_B into canonical order."""
    a >>= 1
    swaps = 0
    while a:
        swaps += bin(a & b).count("1")
        a >>= 1
    return -1 if swaps & 1 else 1


def popcount(a: int) -> int:
    return bin(a).count("1")


@dataclass(frozen=True)
class Algebra:
    """The tables of one geometric algebra (numpy float64; see the module docstring).

    name, signature; n (vectors), dim = 2^n (blades); grades [dim] ints;
    gp, outer, join: [dim, dim, dim] with (x ∘ y)_k = Σ_ij x_i y_j T[i, j, k];
    reverse, involution: [dim] signs; inner_weights [dim]: ⟨x, y⟩ = ⟨x̃ y⟩_0 = Σ_A w_A x_A y_A;
    fixed: index of the group's fixed null vector as a multivector [dim] (None: euclidean);
    linear_basis [M, dim, dim]: the equivariant linear maps (y = B x).
    """

    name: str
    signature: tuple
    n: int
    dim: int
    grades: np.ndarray
    gp: np.ndarray
    outer: np.ndarray
    join: np.ndarray
    reverse: np.ndarray
    involution: np.ndarray
    inner_weights: np.ndarray
    fixed: Optional[np.ndarray]
    linear_basis: np.ndarray = field(repr=False)
    linear_names: tuple = field(repr=False)

    @property
    def pseudoscalar(self) -> int:
        return self.dim - 1

    @property
    def max_grade(self) -> int:
        return self.n

    def blade_name(self, index: int) -> str:
        if index == 0:
            return "1"
        offset = 0 if self.name == "projective" else 1
        return "e" + "".join(str(i + offset) for i in range(self.n) if index >> i & 1)

    def vector(self, coefficients) -> np.ndarray:
        """The multivector Σ_i c_i e_i (basis vectors in signature order)."""
        out = np.zeros(self.dim)
        for i, c in enumerate(coefficients):
            out[1 << i] = c
        return out

    def grade_projector(self, k: int) -> np.ndarray:
        return np.diag((self.grades == k).astype(np.float64))

    # numpy products on single multivectors (tests, construction)
    def product(self, x, y) -> np.ndarray:
        return np.einsum("i,j,ijk->k", x, y, self.gp)

    def wedge(self, x, y) -> np.ndarray:
        return np.einsum("i,j,ijk->k", x, y, self.outer)

    def left_multiplication(self, f) -> np.ndarray:
        """The matrix L with L x = f x."""
        return np.einsum("i,ijk->kj", f, self.gp)


def _tables(signature):
    n = len(signature)
    dim = 1 << n
    grades = np.array([popcount(a) for a in range(dim)])
    gp = np.zeros((dim, dim, dim))
    outer = np.zeros((dim, dim, dim))
    for a in range(dim):
        for b in range(dim):
            sign = reorder_sign(a, b)
            metric = 1.0
            for i in range(n):
                if a & b & (1 << i):
                    metric *= signature[i]
            gp[a, b, a ^ b] = sign * metric
            if a & b == 0:
                outer[a, b, a | b] = sign
    full = dim - 1
    # right complement J(e_A) = s_A e_{~A}, e_A ∧ J(e_A) = I; J^-1(e_{~A}) = s_A e_A
    comp = np.zeros((dim, dim))  # comp[~A, A] = s_A  (J as a matrix acting on coefficient vectors)
    for a in range(dim):
        comp[full ^ a, a] = reorder_sign(a, full ^ a)
    comp_inv = np.linalg.inv(comp)
    # join(x, y) = J^-1( J x ∧ J y )
    join = np.einsum("ia,jb,ijc,kc->abk", comp, comp, outer, comp_inv)
    join[np.abs(join) < 1e-12] = 0.0
    reverse = np.array([(-1.0) ** (g * (g - 1) // 2) for g in grades])
    involution = np.array([(-1.0) ** g for g in grades])
    inner_weights = reverse * np.array([gp[a, a, 0] for a in range(dim)])
    return n, dim, grades, gp, outer, join, reverse, involution, inner_weights


def _independent(candidates, names):
    """A linearly independent subset of the matrices ``candidates`` (greedy, in order)."""
    kept, kept_names = [], []
    for matrix, name in zip(candidates, names):
        if not np.any(matrix):
            continue
        trial = np.stack([m.ravel() for m in kept + [matrix]])
        if np.linalg.matrix_rank(trial, tol=1e-9) == len(kept) + 1:
            kept.append(matrix)
            kept_names.append(name)
    return np.stack(kept), tuple(kept_names)


def _linear_basis(n, dim, grades, gp, fixed):
    projectors = [np.diag((grades == k).astype(np.float64)) for k in range(n + 1)]
    candidates = list(projectors)
    names = [f"<x>_{k}" for k in range(n + 1)]
    if fixed is not None:
        left = np.einsum("i,ijk->kj", fixed, gp)  # y = f x
        for k in range(n + 1):
            for l in range(n + 1):
                once = projectors[l] @ left @ projectors[k]
                candidates.append(once)
                names.append(f"<f<x>_{k}>_{l}")
        for k in range(n + 1):
            for l in range(n + 1):
                for m in range(n + 1):
                    candidates.append(projectors[m] @ left @ projectors[l] @ left @ projectors[k])
                    names.append(f"<f<f<x>_{k}>_{l}>_{m}")
    return _independent(candidates, names)


@lru_cache(maxsize=None)
def algebra(name: str) -> Algebra:
    """The :class:`Algebra` called ``name`` (euclidean, projective, conformal), built once."""
    if name not in SIGNATURES:
        from torchmdx.errors import ModelError

        raise ModelError(f"unknown geometric algebra {name!r}; choices: {', '.join(ALGEBRAS)}")
    signature = SIGNATURES[name]
    n, dim, grades, gp, outer, join, reverse, involution, inner_weights = _tables(signature)
    fixed = None
    if name == "projective":
        fixed = np.zeros(dim)
        fixed[1] = 1.0  # e0
    elif name == "conformal":
        fixed = np.zeros(dim)
        fixed[1 << 3] = 1.0
        fixed[1 << 4] = 1.0  # e_inf = e4 + e5
    basis, basis_names = _linear_basis(n, dim, grades, gp, fixed)
    for array in (gp, outer, join, reverse, involution, inner_weights, basis):
        array.setflags(write=False)
    return Algebra(name, signature, n, dim, grades, gp, outer, join, reverse, involution, inner_weights,
                   fixed, basis, basis_names)


# ---------------------------------------------------------------------------- embeddings
@lru_cache(maxsize=None)
def point_embedding_matrix(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(c, A, Q) such that the embedding of a point x ∈ R³ is c + A x + (|x|²) Q (multivectors
    [dim], [dim, 3], [dim]), derived from the constructions of the module docstring."""
    ga = algebra(name)
    zero = _embed_numpy(ga, np.zeros(3))
    # odd and even parts along each axis: A e_i = (P(e_i) - P(-e_i)) / 2, |e_1|^2 Q = (P(e_1) + P(-e_1)) / 2 - c
    linear = np.stack([(_embed_numpy(ga, e) - _embed_numpy(ga, -e)) / 2 for e in np.eye(3)], axis=1)
    e1 = np.eye(3)[0]
    quadratic = (_embed_numpy(ga, e1) + _embed_numpy(ga, -e1)) / 2 - zero
    for array in (zero, linear, quadratic):
        array.setflags(write=False)
    return zero, linear, quadratic


def _embed_numpy(ga: Algebra, x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if ga.name == "euclidean":
        return ga.vector(x)
    if ga.name == "projective":
        planes = [ga.vector([-x[i]] + [1.0 if j == i else 0.0 for j in range(3)]) for i in range(3)]
        return ga.wedge(ga.wedge(planes[0], planes[1]), planes[2])
    # conformal
    e_o = 0.5 * (ga.vector([0, 0, 0, 0, 1]) - ga.vector([0, 0, 0, 1, 0]))
    e_inf = ga.fixed
    return e_o + ga.vector(list(x) + [0.0, 0.0]) + 0.5 * float(x @ x) * e_inf


def embed_points(name: str, positions):
    """Multivectors [..., dim] of points at ``positions`` [..., 3] (torch), in the algebra's
    representation of a point (module docstring); differentiable."""
    import torch

    matrices = point_embedding_matrix(name)
    c, a, q = (torch.tensor(np.array(m), dtype=positions.dtype, device=positions.device) for m in matrices)
    out = c + positions @ a.T
    if bool(np.any(matrices[2])):
        out = out + (positions * positions).sum(-1, keepdim=True) * q
    return out


# ---------------------------------------------------------------------------- the group (tests)
def reflection_vector(name: str, normal, offset: float = 0.0) -> np.ndarray:
    """The unit vector v = n·e + δ f of the plane with unit normal ``normal`` and offset δ."""
    ga = algebra(name)
    n = np.asarray(normal, dtype=np.float64)
    n = n / np.linalg.norm(n)
    if ga.name == "euclidean":
        return ga.vector(n)
    if ga.name == "projective":
        return ga.vector([0.0, *n]) + offset * ga.fixed
    return ga.vector([*n, 0.0, 0.0]) + offset * ga.fixed


def versor(name: str, vectors) -> tuple[np.ndarray, int]:
    """(u, parity): the product of the reflection ``vectors`` and its parity (number mod 2)."""
    ga = algebra(name)
    u = np.zeros(ga.dim)
    u[0] = 1.0
    for v in vectors:
        u = ga.product(u, v)
    return u, len(vectors) % 2


def action_matrix(name: str, u: np.ndarray, parity: int) -> np.ndarray:
    """The matrix of x -> ρ_u(x) = u x̂^parity u⁻¹ (u⁻¹ = ũ / (u ũ))."""
    ga = algebra(name)
    u_rev = ga.reverse * u
    norm = ga.product(u, u_rev)[0]
    u_inv = u_rev / norm
    left = ga.left_multiplication(u)
    right = np.einsum("ijk,j->ki", ga.gp, u_inv)  # y = x u^-1
    inv = np.diag(ga.involution) if parity else np.eye(ga.dim)
    return right @ left @ inv


def random_versor(name: str, rng: np.random.Generator, count: int, translate: bool = True):
    """A random group element made of ``count`` reflections: (u, parity)."""
    vectors = []
    for _ in range(count):
        normal = rng.normal(size=3)
        offset = float(rng.normal()) if (translate and name != "euclidean") else 0.0
        vectors.append(reflection_vector(name, normal, offset))
    return versor(name, vectors)
