"""Dataset summaries for ``torchmdx data info`` (numbers in eV, Å, eV/Å)."""

from __future__ import annotations

import numpy as np

from torchmdx.data.atomref import energy_statistics
from torchmdx.data.structures import Structures, element_symbol


def _element_counts(st: Structures, built: dict) -> tuple[np.ndarray, np.ndarray]:
    if built.get("element_counts"):
        pairs = sorted((int(z), int(c)) for z, c in built["element_counts"].items() if c)
        return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    seen = np.zeros(256, dtype=np.int64)
    step = 1 << 24
    for start in range(0, st.n_atoms, step):
        seen += np.bincount(np.asarray(st.z[start:start + step], dtype=np.int64), minlength=256)[:256]
    zs = np.flatnonzero(seen)
    return zs, seen[zs]


def _statistics(st: Structures, built: dict) -> dict:
    """energy_statistics of all structures; the force sums of the cache's build when it has them
    (so that a summary of a cache reads no per-atom array)."""
    if built.get("force_components") is None or st.forces is None:
        return energy_statistics(st)
    energy = np.asarray(st.energy, dtype=np.float64)
    per_atom = energy / st.atoms_per_structure
    components = built["force_components"]
    return {"energy_mean": float(energy.mean()), "energy_std": float(energy.std()),
            "energy_per_atom_mean": float(per_atom.mean()), "energy_per_atom_std": float(per_atom.std()),
            "force_rms": float(np.sqrt(built["force_sq_sum"] / components)) if components else None,
            "force_max": built["force_max"]}


def summarize(st: Structures) -> dict:
    """A JSON-ready summary of ``st`` (of a memory-mapped cache: reading only per-structure
    arrays and the statistics stored when the cache was built)."""
    natoms = st.atoms_per_structure
    built = st.metadata.get("cache_statistics") or {}
    zs, counts = _element_counts(st, built)
    stats = _statistics(st, built)
    out = {
        "source": st.source,
        "format": st.metadata.get("format"),
        "n_structures": len(st),
        "n_atoms": st.n_atoms,
        "atoms_per_structure": {"min": int(natoms.min()), "mean": float(natoms.mean()), "max": int(natoms.max())},
        "elements": [int(z) for z in zs],
        "element_symbols": [element_symbol(int(z)) for z in zs],
        "element_counts": {str(int(z)): int(c) for z, c in zip(zs, counts)},
        "energy_mean_eV": stats["energy_mean"],
        "energy_std_eV": stats["energy_std"],
        "energy_min_eV": float(np.min(st.energy)),
        "energy_max_eV": float(np.max(st.energy)),
        "energy_per_atom_mean_eV": stats["energy_per_atom_mean"],
        "energy_per_atom_std_eV": stats["energy_per_atom_std"],
        "has_forces": st.forces is not None,
        "force_rms_eV_per_A": stats["force_rms"],
        "force_max_eV_per_A": stats["force_max"],
        "periodic": bool(np.asarray(st.pbc).any()),
        "n_periodic": int(np.asarray(st.pbc).reshape(len(st), -1).any(axis=1).sum()) if len(st) else 0,
        "groups": None,
        "group_key": st.metadata.get("group_key"),
        "energy_key": st.metadata.get("energy_key"),
        "extras": {k: st.extra_units.get(k, "") for k in st.extras},
        "atom_extras": {k: st.extra_units.get(k, "") for k in st.atom_extras},
        "theory": st.metadata.get("theory"),
        "units_in_file": st.metadata.get("units_in"),
        "dropped": st.metadata.get("dropped", 0),
        "notes": st.metadata.get("notes"),
        "cache": st.metadata.get("cache"),
    }
    if st.group is not None:
        sizes = np.bincount(np.asarray(st.group), minlength=len(st.group_names))
        out["groups"] = {name: int(n) for name, n in zip(st.group_names, sizes)}
    return out


def format_summary(s: dict) -> str:
    """Human-readable lines of a :func:`summarize` dict (plus ``split`` / ``atomic_references``
    entries when present)."""
    aps = s["atoms_per_structure"]
    lines = [
        ("source", f"{s['source']}  (format {s['format']})"),
        ("structures", f"{s['n_structures']}"),
        ("atoms", f"{s['n_atoms']}  ({aps['min']}..{aps['max']} per structure, mean {aps['mean']:.1f})"),
        ("elements", ", ".join(f"{sym} ({z}) x{s['element_counts'][str(z)]}"
                               for z, sym in zip(s["elements"], s["element_symbols"]))),
        ("energy", f"mean {s['energy_mean_eV']:.6f} eV, std {s['energy_std_eV']:.6f} eV, "
                   f"range [{s['energy_min_eV']:.6f}, {s['energy_max_eV']:.6f}] eV"
                   + (f"  (key {s['energy_key']})" if s.get("energy_key") else "")),
        ("energy/atom", f"mean {s['energy_per_atom_mean_eV']:.6f} eV, std {s['energy_per_atom_std_eV']:.6f} eV"),
    ]
    if s["has_forces"]:
        lines.append(("forces", f"rms {s['force_rms_eV_per_A']:.6f} eV/Å, "
                                f"max |F| {s['force_max_eV_per_A']:.6f} eV/Å"))
    else:
        lines.append(("forces", "none"))
    n_periodic = s.get("n_periodic", s["n_structures"] if s["periodic"] else 0)
    if 0 < n_periodic < s["n_structures"]:  # a mixed file: say how many, not a plain yes
        lines.append(("periodic", f"{n_periodic} of {s['n_structures']} structures (the others open)"))
    else:
        lines.append(("periodic", "yes" if s["periodic"] else "no"))
    if s["groups"]:
        groups = ", ".join(f"{k} {v}" for k, v in list(s["groups"].items())[:12])
        more = f", ... ({len(s['groups'])} groups)" if len(s["groups"]) > 12 else ""
        lines.append(("groups", f"{len(s['groups'])}" + (f" by '{s['group_key']}'" if s.get("group_key") else "")
                      + f": {groups}{more}"))
    if s["extras"]:
        lines.append(("extras", ", ".join(f"{k} [{u}]" for k, u in s["extras"].items())))
    if s["atom_extras"]:
        lines.append(("atom extras", ", ".join(f"{k} [{u}]" for k, u in s["atom_extras"].items())))
    if s.get("units_in_file"):
        lines.append(("file units", ", ".join(f"{k} {v}" for k, v in s["units_in_file"].items())))
    if s.get("theory"):
        lines.append(("theory", str(s["theory"])))
    if s.get("notes"):
        lines.append(("notes", str(s["notes"])))
    if s.get("split"):
        sp = s["split"]
        text = f"train {sp['train']}, val {sp['val']}, test {sp['test']}"
        if sp.get("unused"):
            text += f", unused {sp['unused']}"
        if sp.get("groups"):
            text += "; test groups: " + (", ".join(sp["groups"]["test"]) or "none")
        lines.append(("split", text))
    if s.get("atomic_references_eV"):
        lines.append(("atom refs", ", ".join(f"{element_symbol(int(z))} {v:.6f}"
                                             for z, v in s["atomic_references_eV"].items()) + " eV"))
    if s.get("cache"):
        lines.append(("cache", s["cache"]))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
