"""F(Θ, t) = ‖exp(−ηΘt) r‖²: the test loss of the linearised (NTK) training dynamics, the
term of LENSLLM's law L(D) = B / (F(Θ, t) + D^β) + E.

With Θ = U diag(λ) Uᵀ (`eigh` of the symmetrised kernel, negative round-off eigenvalues
clipped to 0), F(Θ, t) = Σ_k exp(−2ηλ_k t) (u_kᵀ r)². `features` does the O(N³)
eigendecomposition once; `ntk_test_loss_from_features` is O(N), differentiable in t and η,
and vmappable, for use inside a jitted fitting loop. `check_kernel` / `checked_features`
are the non-jittable front doors that refuse a kernel that is not a Gram matrix.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lensllm_jax.core._ntk_checks import _check_finite, _is_concrete, _where
from lensllm_jax.errors import NTKError

__all__ = [
    "KernelDiagnostics",
    "NTKFeatures",
    "check_kernel",
    "checked_features",
    "features",
    "kernel_diagnostics",
    "ntk_test_loss",
    "ntk_test_loss_from_features",
]


class NTKFeatures(NamedTuple):
    """What F(Θ, t) needs of a kernel: Θ = U diag(eigenvalues) Uᵀ, projected_residual = Uᵀ r.

    eigenvalues: (..., N), clipped to >= 0; projected_residual: (..., N).
    """

    eigenvalues: jax.Array | np.ndarray
    projected_residual: jax.Array | np.ndarray


class KernelDiagnostics(NamedTuple):
    """How far a kernel is from symmetric PSD (all relative to max |λ|, 0 for a clean kernel).

    asymmetry: max |Θ − Θᵀ| / max |Θ|; min_eigenvalue: smallest eigenvalue of (Θ + Θᵀ)/2;
    clipped: Σ max(−λ_k, 0) / max_k |λ_k|, the eigenvalue mass that `features` set to zero.
    """

    asymmetry: jax.Array
    min_eigenvalue: jax.Array
    clipped: jax.Array


def _sym(theta: jax.Array) -> jax.Array:
    return 0.5 * (theta + jnp.swapaxes(theta, -1, -2))


@jax.jit  # one program: eager, each of its operations compiled a program of its own
def features(theta: jax.Array, residual: jax.Array) -> NTKFeatures:
    """Eigendecompose the symmetrised kernel once: O(N³) FLOPs, O(N²) memory; jittable.

    theta: (..., N, N) symmetric PSD up to round-off; residual: (..., N) = f0(X) − y.
    Negative eigenvalues (round-off) are clipped to 0; see `kernel_diagnostics` for how much.
    """
    theta = jnp.asarray(theta)
    residual = jnp.asarray(residual, dtype=theta.dtype)
    lam, u = jnp.linalg.eigh(_sym(theta))
    proj = jnp.einsum("...nk,...n->...k", u, residual)
    return NTKFeatures(jnp.maximum(lam, 0.0), proj)


def ntk_test_loss_from_features(features: NTKFeatures, t: Any, eta: Any) -> jax.Array:
    """F(t) = Σ_k exp(−2 η λ_k t) (u_kᵀ r)²: O(N) FLOPs; differentiable in t and η.

    t and eta broadcast against the leading axes of `features` (scalars for one candidate).
    Stable for any λ >= 0 and η t >= 0: exponents are <= 0, so large λ (1e8 and beyond) give
    exp -> 0 and finite gradients (−2 λ t e^{−2ηλt} -> 0), never overflow.
    """
    lam, proj = features
    t = jnp.asarray(t)[..., None]
    eta = jnp.asarray(eta)[..., None]
    return jnp.sum(jnp.exp(-2.0 * eta * t * lam) * proj**2, axis=-1)


def ntk_test_loss(theta: jax.Array, residual: jax.Array, t: Any, eta: Any) -> jax.Array:
    """F(Θ, t) = ‖expm(−η Θ t) r‖², by `eigh` (= `ntk_test_loss_from_features(features(Θ, r))`).

    O(N³) for the eigendecomposition; vmappable over candidates; differentiable in t and η.
    Called with concrete values (not under jit/vmap/grad), the arguments are checked first:
    `NTKError` (one line) for a kernel that is not (..., N, N), not finite or not symmetric
    (relative asymmetry above 1e-4 in float32, 1e-8 in float64: a Gram matrix is
    symmetric up to round-off), a residual of another shape or not finite, t < 0 or η < 0.
    """
    if _is_concrete((theta, residual, t, eta)):
        _check_loss_args(theta, residual, t, eta)
    return ntk_test_loss_from_features(features(theta, residual), t, eta)


def _check_loss_args(theta: Any, residual: Any, t: Any, eta: Any) -> None:
    th, r = np.asarray(theta), np.asarray(residual)
    if th.ndim < 2 or th.shape[-1] != th.shape[-2]:
        raise NTKError(f"kernel must be (..., N, N), got shape {th.shape}")
    if r.shape != th.shape[:-1]:
        raise NTKError(f"residual has shape {r.shape}, expected {th.shape[:-1]} (one per row)")
    _check_finite(th, "kernel", None)
    _check_finite(r, "residual", None)
    scale = max(float(np.max(np.abs(th), initial=0.0)), np.finfo(np.float64).tiny)
    asym = float(np.max(np.abs(th - np.swapaxes(th, -1, -2)), initial=0.0)) / scale
    rtol = 1e-8 if th.dtype == np.float64 else 1e-4
    if asym > rtol:
        raise NTKError(
            f"kernel is not symmetric (relative asymmetry {asym:.2e} > {rtol:.0e}); pass a "
            "Gram matrix J Jᵀ, not a cross kernel"
        )
    for what, v in (("t", t), ("eta", eta)):
        a = np.asarray(v, np.float64)
        if not np.all(np.isfinite(a) & (a >= 0)):
            raise NTKError(f"{what} must be finite and >= 0, got {v!r:.40}")


@jax.jit  # one program, as `features`
def kernel_diagnostics(theta: jax.Array) -> KernelDiagnostics:
    """Asymmetry and negative-eigenvalue mass of a kernel (jittable; O(N³))."""
    theta = jnp.asarray(theta)
    lam = jnp.linalg.eigvalsh(_sym(theta))
    scale = jnp.maximum(jnp.max(jnp.abs(lam), axis=-1), jnp.finfo(theta.dtype).tiny)
    tscale = jnp.maximum(jnp.max(jnp.abs(theta), axis=(-2, -1)), jnp.finfo(theta.dtype).tiny)
    asym = jnp.max(jnp.abs(theta - jnp.swapaxes(theta, -1, -2)), axis=(-2, -1)) / tscale
    return KernelDiagnostics(asym, lam[..., 0], jnp.sum(jnp.maximum(-lam, 0.0), -1) / scale)


def check_kernel(
    theta: Any, *, name: str | None = None, rtol: float | None = None
) -> KernelDiagnostics:
    """Non-jittable front door: shape, finiteness and PSD-up-to-round-off checks.

    Raises `NTKError` if Θ is not (..., N, N), has NaN/inf, or its asymmetry or clipped negative
    eigenvalue mass (relative to max |λ|) exceeds `rtol` (default 1e-4 for float32, 1e-8 for
    float64: round-off of a Gram matrix, a real non-PSD kernel is far above). Returns the
    diagnostics (how much was symmetrised / clipped) otherwise.
    """
    arr = np.asarray(theta)
    if arr.ndim < 2 or arr.shape[-1] != arr.shape[-2]:
        raise NTKError(f"kernel{_where(name)} must be (..., N, N), got shape {arr.shape}")
    _check_finite(arr, "kernel", name)
    if rtol is None:
        rtol = 1e-8 if arr.dtype == np.float64 else 1e-4
    diag = kernel_diagnostics(jnp.asarray(arr))
    asym = float(np.max(np.asarray(diag.asymmetry)))  # on the host: no program per reduction
    clipped = float(np.max(np.asarray(diag.clipped)))
    if asym > rtol:
        raise NTKError(
            f"kernel{_where(name)} is not symmetric (relative asymmetry {asym:.2e} > {rtol:.0e}); "
            "pass a Gram matrix J Jᵀ, not a cross kernel"
        )
    if clipped > rtol:
        raise NTKError(
            f"kernel{_where(name)} is not PSD (negative eigenvalue mass {clipped:.2e} of max |λ| "
            f"> {rtol:.0e}); it is not a Gram matrix"
        )
    return diag


def checked_features(
    theta: Any, residual: Any, *, name: str | None = None, rtol: float | None = None
) -> tuple[NTKFeatures, KernelDiagnostics]:
    """`check_kernel` + residual checks, then `features`. Non-jittable; returns the diagnostics
    (asymmetry removed and eigenvalue mass clipped) alongside the features."""
    diag = check_kernel(theta, name=name, rtol=rtol)
    r = np.asarray(residual)
    t = np.asarray(theta)
    if r.shape != t.shape[:-1]:
        raise NTKError(
            f"residual{_where(name)} has shape {r.shape}, expected {t.shape[:-1]} "
            "(one entry per kernel row)"
        )
    _check_finite(r, "residual", name)
    return features(jnp.asarray(t), jnp.asarray(r, dtype=t.dtype)), diag
