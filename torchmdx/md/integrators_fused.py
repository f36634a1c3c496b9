"""The integrators' per-step element-wise work as pure tensor functions, compiled into few kernels.

An MD step of a small molecule is latency-bound: on the GPU every kernel launch costs ~3 µs
whatever its size, and the eager integrators of :mod:`torchmdx.md.integrators` launch 8 (NVE)
to ~40 (Langevin BAOAB, Bussi, Nosé–Hoover chain) small kernels around the force call. Here each
integrator's step is split at the force call into a ``*_before`` and an ``*_after`` function of
tensors only (positions, velocities, forces, per-atom and per-structure constants, the thermostat
variables, and the random numbers). :class:`FusedFunctions` hands them out compiled with
``torch.compile`` (inductor fuses them into a handful of kernels, inside the engine's CUDA graph)
or plain (``compile=False``: the same functions run op by op, what the tests compare).

Each function performs exactly the operations of the eager integrator in the same order (the
eager classes stay the reference and the default), so uncompiled they agree bit for bit and
compiled to rounding (inductor may contract or reorder floating-point operations). Random numbers
are *not* drawn here: the integrator draws them with the engine's ``torch.Generator`` before
calling, exactly as the eager step does (same calls, same order), so random streams, restart
files and the ``atom_perm`` semantics (Langevin noise drawn in the input order of the atoms,
permuted inside the fused function) are unchanged.

Per-structure sums (kinetic energy, centre-of-mass momentum) are ``index_add`` over the batch
index, as in :class:`torchmdx.md.system.System`, so batches of several structures (replicas or
different molecules) stay correct.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Tuple

import sys
import types

import torch

from torchmdx.md.system import per_structure_sum

Tensor = torch.Tensor


# ---------------------------------------------------------------------------- shared pieces
def kinetic_energy(velocities: Tensor, masses: Tensor, batch: Tensor, num_structures: int) -> Tensor:
    """K_b = ½ Σ m v² [B] (as :meth:`System.kinetic_energy`)."""
    return per_structure_sum(0.5 * masses * (velocities * velocities).sum(-1), batch, num_structures)


def remove_com_velocity(velocities: Tensor, masses: Tensor, batch: Tensor, total_mass: Tensor,
                        multi_atom: Tensor, num_structures: int) -> Tensor:
    """v - (Σ m v)/(Σ m) per structure of more than one atom (as :meth:`System.remove_com_velocity`)."""
    momentum = per_structure_sum(masses.unsqueeze(-1) * velocities, batch, num_structures)
    com = momentum / total_mass.unsqueeze(-1)
    com = torch.where(multi_atom.unsqueeze(-1), com, torch.zeros_like(com))
    return velocities - com[batch]


def _kick(velocities: Tensor, forces: Tensor, inverse_masses: Tensor, dt: float) -> Tensor:
    return velocities + dt * forces * inverse_masses


def _drift(positions: Tensor, velocities: Tensor, dt: float) -> Tensor:
    return positions + dt * velocities


# ---------------------------------------------------------------------------- NVE velocity Verlet
def verlet_before(positions: Tensor, velocities: Tensor, forces: Tensor, inverse_masses: Tensor,
                  dt: float) -> Tuple[Tensor, Tensor]:
    """½ kick and drift: (positions, velocities) before the force call."""
    velocities = _kick(velocities, forces, inverse_masses, 0.5 * dt)
    return _drift(positions, velocities, dt), velocities


def verlet_after(velocities: Tensor, forces: Tensor, inverse_masses: Tensor, dt: float) -> Tensor:
    """The closing ½ kick (also the after-part of Langevin BAOAB and of Bussi)."""
    return _kick(velocities, forces, inverse_masses, 0.5 * dt)


# ---------------------------------------------------------------------------- Langevin BAOAB
def langevin_before(positions: Tensor, velocities: Tensor, forces: Tensor, thermostat_energy: Tensor,
                    noise: Tensor, atom_perm: Optional[Tensor], inverse_masses: Tensor, noise_scale: Tensor,
                    masses: Tensor, batch: Tensor, total_mass: Tensor, multi_atom: Tensor,
                    dt: float, c1: float, num_structures: int) -> Tuple[Tensor, Tensor, Tensor]:
    """B ½dt, A ½dt, O (``noise`` [N, 3] standard normal in the input order, permuted here by
    ``atom_perm``), centre-of-mass removal, thermostat energy, A ½dt:
    (positions, velocities, thermostat_energy) before the force call."""
    h = 0.5 * dt
    velocities = _kick(velocities, forces, inverse_masses, h)
    positions = _drift(positions, velocities, h)
    kinetic_before = kinetic_energy(velocities, masses, batch, num_structures)
    if atom_perm is not None:
        noise = noise.index_select(0, atom_perm)
    velocities = c1 * velocities + noise_scale * noise
    velocities = remove_com_velocity(velocities, masses, batch, total_mass, multi_atom, num_structures)
    thermostat_energy = thermostat_energy - (kinetic_energy(velocities, masses, batch, num_structures) - kinetic_before)
    positions = _drift(positions, velocities, h)
    return positions, velocities, thermostat_energy


# ---------------------------------------------------------------------------- Bussi
def bussi_before(positions: Tensor, velocities: Tensor, forces: Tensor, thermostat_energy: Tensor,
                 r1: Tensor, gamma: Tensor, inverse_masses: Tensor, masses: Tensor, batch: Tensor,
                 degrees_of_freedom: Tensor, target_kinetic: Tensor, has_extra_dof: Tensor,
                 dt: float, c: float, num_structures: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Stochastic velocity rescaling (``r1`` [B] standard normal, ``gamma`` [B] Gamma((N_f-1)/2)
    variates), then ½ kick and drift: (positions, velocities, thermostat_energy)."""
    kinetic = kinetic_energy(velocities, masses, batch, num_structures)
    dof, target = degrees_of_freedom, target_kinetic
    chi2 = 2.0 * gamma
    chi2 = torch.where(has_extra_dof, chi2, torch.zeros_like(chi2))
    new_kinetic = (
        kinetic
        + (1.0 - c) * (target * (r1 * r1 + chi2) / dof - kinetic)
        + 2.0 * r1 * torch.sqrt(c * (1.0 - c) * kinetic * target / dof)
    )
    new_kinetic = torch.clamp(new_kinetic, min=0.0)
    alpha = torch.where(kinetic > 0, torch.sqrt(new_kinetic / torch.where(kinetic > 0, kinetic, 1.0)), 1.0)
    velocities = velocities * alpha[batch].unsqueeze(-1)
    thermostat_energy = thermostat_energy - (alpha * alpha - 1.0) * kinetic
    positions, velocities = verlet_before(positions, velocities, forces, inverse_masses, dt)
    return positions, velocities, thermostat_energy


# ---------------------------------------------------------------------------- Nosé–Hoover chain
def _chain_force(k: int, v: List[Tensor], kinetic: Tensor, q: Tensor, degrees_of_freedom: Tensor,
                 kT: float) -> Tensor:
    if k == 0:
        return (2.0 * kinetic - degrees_of_freedom * kT) / q[:, 0]
    return (q[:, k - 1] * v[k - 1] * v[k - 1] - kT) / q[:, k]


def chain_half_step(velocities: Tensor, xi: Tensor, v_xi: Tensor, q: Tensor, masses: Tensor, batch: Tensor,
                    degrees_of_freedom: Tensor, dt: float, kT: float,
                    num_structures: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The chain over dt/2 and the velocity scaling (as :meth:`NoseHooverChain.half_step`):
    (velocities, xi, v_xi)."""
    m = q.shape[1]
    h = 0.5 * dt
    v = [v_xi[:, k] for k in range(m)]
    kinetic = kinetic_energy(velocities, masses, batch, num_structures)
    v[m - 1] = v[m - 1] + 0.5 * h * _chain_force(m - 1, v, kinetic, q, degrees_of_freedom, kT)
    for k in range(m - 2, -1, -1):
        e = torch.exp(-0.25 * h * v[k + 1])
        v[k] = (v[k] * e + 0.5 * h * _chain_force(k, v, kinetic, q, degrees_of_freedom, kT)) * e
    scale = torch.exp(-h * v[0])
    velocities = velocities * scale[batch].unsqueeze(-1)
    kinetic = kinetic * scale * scale
    xi = xi + h * torch.stack(v, dim=1)
    for k in range(0, m - 1):
        e = torch.exp(-0.25 * h * v[k + 1])
        v[k] = (v[k] * e + 0.5 * h * _chain_force(k, v, kinetic, q, degrees_of_freedom, kT)) * e
    v[m - 1] = v[m - 1] + 0.5 * h * _chain_force(m - 1, v, kinetic, q, degrees_of_freedom, kT)
    return velocities, xi, torch.stack(v, dim=1)


def nose_hoover_before(positions: Tensor, velocities: Tensor, forces: Tensor, xi: Tensor, v_xi: Tensor,
                       q: Tensor, inverse_masses: Tensor, masses: Tensor, batch: Tensor, degrees_of_freedom: Tensor,
                       dt: float, kT: float, num_structures: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Chain half step, ½ kick, drift: (positions, velocities, xi, v_xi)."""
    velocities, xi, v_xi = chain_half_step(velocities, xi, v_xi, q, masses, batch, degrees_of_freedom, dt, kT,
                                           num_structures)
    positions, velocities = verlet_before(positions, velocities, forces, inverse_masses, dt)
    return positions, velocities, xi, v_xi


def nose_hoover_after(velocities: Tensor, forces: Tensor, xi: Tensor, v_xi: Tensor, q: Tensor,
                      inverse_masses: Tensor, masses: Tensor, batch: Tensor, degrees_of_freedom: Tensor,
                      dt: float, kT: float, num_structures: int) -> Tuple[Tensor, Tensor, Tensor]:
    """½ kick, chain half step: (velocities, xi, v_xi)."""
    velocities = _kick(velocities, forces, inverse_masses, 0.5 * dt)
    return chain_half_step(velocities, xi, v_xi, q, masses, batch, degrees_of_freedom, dt, kT, num_structures)


# ---------------------------------------------------------------------------- the step's check
def non_finite(bad: Tensor, forces: Tensor, energy: Tensor) -> Tensor:
    """bad OR (Σ F + Σ E is not finite): the engine's per-step non-finite check
    (``RunLoop._bad_flag``, ORed into the chunk's flag), as one function: compiled, one kernel
    instead of six (two sums, an add, isfinite, a negation and the OR)."""
    return bad | ~torch.isfinite(forces.sum() + energy.sum())


FUNCTIONS: Dict[str, Callable] = {
    "non_finite": non_finite,
    "verlet_before": verlet_before,
    "verlet_after": verlet_after,
    "langevin_before": langevin_before,
    "bussi_before": bussi_before,
    "nose_hoover_before": nose_hoover_before,
    "nose_hoover_after": nose_hoover_after,
}


class _Compiled:
    """``plain`` compiled at the first call; if compiling fails, one line says so and the plain
    function (the same operations) is used from then on. ``compiled`` tells which one runs."""

    def __init__(self, plain: Callable, device_type: str):
        from torchmdx.nn import compile_cache
        from torchmdx.nn.traced import COMPILE_OPTIONS

        compile_cache.ensure()  # compiled kernels kept across runs
        options = COMPILE_OPTIONS.get(device_type)
        self.plain = plain
        self.torch_compiled = torch.compile(plain, dynamic=False, fullgraph=True, options=options or None)
        self.fn: Optional[Callable] = None
        self.compiled: Optional[bool] = None

    def __call__(self, *tensors):
        if self.fn is not None:
            return self.fn(*tensors)
        try:
            out = self.torch_compiled(*tensors)
            self.fn, self.compiled = self.torch_compiled, True
        except Exception as exc:  # noqa: BLE001 - compiler failures have no stable type
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            print(f"note: compiling the fused integrator ({self.plain.__name__}) failed ({reason}); "
                  "running its operations uncompiled", file=sys.stderr)
            out = self.plain(*tensors)
            self.fn, self.compiled = self.plain, False
        return out


class FusedFunctions:
    """The functions of :data:`FUNCTIONS` bound to their Python constants (time step, thermostat
    constants, number of structures) and, with ``compile``, compiled by ``torch.compile``
    (``dynamic=False, fullgraph=True``, :data:`torchmdx.nn.traced.COMPILE_OPTIONS` of the
    device type; compiled at the first call). ``calls`` counts the calls per function. Each
    instance compiles its own functions (once per engine: a second engine recompiles, mostly
    from inductor's cache)."""

    def __init__(self, compile: bool = True):
        self.compile = bool(compile)
        self._functions: Dict[tuple, Callable] = {}
        self.calls: Dict[str, int] = {}

    def get(self, name: str, device: torch.device, **constants) -> Callable:
        key = (name, torch.device(device).type, tuple(sorted(constants.items())))
        fn = self._functions.get(key)
        if fn is None:
            base = FUNCTIONS[name]

            def bound(*tensors, _base=base, _constants=dict(constants)):
                return _base(*tensors, **_constants)

            # a code object of its own: dynamo keeps its compiled graphs per code object (at
            # most ``recompile_limit`` of them), and one shared wrapper would collect every
            # function and constant set of the process there
            code = bound.__code__.replace(co_name=name, co_qualname=f"fused.{name}")
            fresh = types.FunctionType(code, bound.__globals__, name, bound.__defaults__, bound.__closure__)
            fresh.__kwdefaults__ = bound.__kwdefaults__
            bound = fresh
            if self.compile:
                bound = _Compiled(bound, torch.device(device).type)
            fn = self._functions[key] = bound
        self.calls[name] = self.calls.get(name, 0) + 1
        return fn
