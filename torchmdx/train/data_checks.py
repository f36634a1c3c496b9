"""Checks of the training data against the config before anything is trained, each a one-line
:class:`~torchmdx.errors.DataError` or :class:`~torchmdx.errors.ConfigError` naming the file or key: energies
that are all one value, cells the cutoff cannot be used with, stress labels without a volume (moved out of
:mod:`torchmdx.train.run`, round 24), and a cutoff shorter than every interatomic distance (round 24); and the
warnings for labels in another unit or convention (round 28: :func:`label_unit_warnings`; the stress's sign and
unit after round 29)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torchmdx.config import key_name
from torchmdx.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torchmdx.train.config import RunConfig

#: training structures (spread over the split) whose interatomic distances are compared with the model's cutoff
#: before training: a bounded sample, not a pass over the data
CUTOFF_SAMPLE_STRUCTURES = 64
#: ... and at most this many atoms of them (the first sampled structure is taken whatever its size)
CUTOFF_SAMPLE_ATOMS = 4096
#: the farthest (Å) the shortest distance of that sample is looked for, for the line of a refusal
SHORTEST_DISTANCE_SEARCH = 16.0


def _check_energies_differ(datamodule, cfg: RunConfig, source) -> None:
    """Training energies that are all the same number (a converter that wrote 0, or one value, where no
    energies were computed): energy-only training fitted them to a zero loss without a word; beside forces
    the energy term pulled every structure towards one energy. Compared as read (before the atomic
    references): exact equality needs no tolerance, while fitted references explain the real energies of a
    set with no more compositions than elements (isolated atoms, a tiny set) exactly, leaving no spread."""
    import numpy as np

    train = np.asarray(datamodule.split["train"])
    if train.size < 2:
        return
    energy = np.asarray(datamodule.dataset.structures.energy, dtype=np.float64).reshape(-1)[train]
    if energy.size < 2 or not (energy == energy[0]).all():
        return
    key = f" (data.energy_key '{cfg.data_config.energy_key}')" if cfg.data_config.energy_key else ""
    advice = ("set train.energy_weight: 0 to train on the forces alone" if cfg.train.train_forces else
              "energy-only training on them learns nothing")
    raise DataError(f"{source}: every energy of the {train.size} training structures is {energy[0]:.10g} eV{key}: "
                    f"one value written where no energies were computed? {advice} (or data.check_labels: false if "
                    "they are meant to be equal)")


def check_cells(dataset, cutoff: float, source, model=None) -> None:
    """Refuse, in one line naming the structure, a periodic structure whose cell cannot be used
    with the model's ``cutoff`` (Å): non-finite, singular, or narrower than twice the cutoff
    (minimum image would miss pairs), or any periodic structure where ``model`` takes none (GATr, the
    transformer: ``model.periodic``). All cells at once on the CPU (:mod:`torchmdx.kernels.cell_geometry`);
    the training steps check each batch again on the device."""
    import numpy as np
    import torch

    from torchmdx.kernels.cell_geometry import cell_geometry, describe_problem, first_bad_structure
    from torchmdx.nn.attention_potential import periodic_structure_line

    st = dataset.structures
    pbc = np.asarray(st.pbc)
    line = periodic_structure_line(model, pbc, lambda index: f"{source}: structure {index}")
    if line:
        raise DataError(line)
    periodic = np.nonzero(pbc.any(-1))[0]
    for start in range(0, periodic.size, 1 << 16):  # bounded memory for millions of structures
        chunk = periodic[start:start + (1 << 16)]
        cells, flags = torch.from_numpy(np.asarray(st.cell[chunk], dtype=np.float64)), torch.from_numpy(pbc[chunk])
        value = int(first_bad_structure(cell_geometry(cells, flags), cutoff))
        if value >= 0:
            index = int(chunk[value // 4])
            raise DataError(f"{source}: " + describe_problem(value % 4, cells[value // 4:value // 4 + 1],
                                                             flags[value // 4:value // 4 + 1], cutoff,
                                                             label=f"structure {index}"))
    _check_stress_volumes(st, source)


def _check_stress_volumes(st, source) -> None:
    """A stress label on a structure whose cell spans no volume (a molecule written without a
    cell, beside periodic structures): the model's stress there is NaN (σ = (1/V) ∂E/∂ε), so its
    finite label made the loss NaN ("training diverged: try a smaller train.lr"), or, with no
    periodic structure in a batch, "stress needs a periodic cell" naming nothing."""
    import numpy as np

    stress = st.extras.get("stress") if isinstance(getattr(st, "extras", None), dict) else None
    if stress is None:
        return
    for start in range(0, len(stress), 1 << 16):
        labels = np.asarray(stress[start:start + (1 << 16)], dtype=np.float64)
        cells = np.asarray(st.cell[start:start + len(labels)], dtype=np.float64)
        known = np.isfinite(labels.reshape(len(labels), -1)).all(-1)
        with np.errstate(invalid="ignore"):
            volume = np.abs(np.linalg.det(cells)) if len(cells) else np.zeros(0)
        bad = np.flatnonzero(known & ~(volume > 1e-9))
        if bad.size:
            index = start + int(bad[0])
            pbc = np.asarray(st.pbc[index], dtype=bool).tolist()
            raise DataError(f"{source}: structure {index} has a stress label but its cell spans no volume (pbc {pbc}, "
                            f"cell {np.asarray(st.cell[index]).tolist()} Å): a stress is (1/V) ∂E/∂ε; give the structure "
                            "its cell, or drop its stress (structures without one are left out of the stress term)")




def check_cutoff_reaches_neighbours(structures, train_indices, cutoff_upper: float, cutoff_lower: float,
                                    source) -> None:
    """Refuse a model whose cutoff window ``[cutoff_lower, cutoff_upper)`` (Å) holds no interatomic distance of a
    sample of the training structures (``model.cutoff_upper: 0.5`` for water): such a model sees no neighbours
    (zero forces, energies from the composition alone) and trained without a word (round 24). Up to
    :data:`CUTOFF_SAMPLE_STRUCTURES` structures (at most :data:`CUTOFF_SAMPLE_ATOMS` atoms) spread evenly over
    ``train_indices`` are looked at, minimum image where periodic; structures of one open atom have no
    distances and are not counted."""
    import numpy as np
    import torch

    from torchmdx.kernels.neighbors_ref import neighbor_list

    train = np.asarray(train_indices, dtype=np.int64).reshape(-1)
    if train.size == 0:
        return
    picks = np.unique(np.linspace(0, train.size - 1, min(train.size, CUTOFF_SAMPLE_STRUCTURES)).round()
                      .astype(np.int64))
    offsets = np.asarray(structures.offsets, dtype=np.int64)
    pos, batch, cells, pbcs, atoms = [], [], [], [], 0
    for index in train[picks]:
        start, stop = int(offsets[index]), int(offsets[index + 1])
        pbc = np.asarray(structures.pbc[index], dtype=bool).reshape(3)
        if stop - start < (1 if pbc.any() else 2):
            continue
        if pos and atoms + stop - start > CUTOFF_SAMPLE_ATOMS:
            continue
        pos.append(np.asarray(structures.pos[start:stop], dtype=np.float64))
        batch.append(np.full(stop - start, len(cells), dtype=np.int64))
        cells.append(np.asarray(structures.cell[index], dtype=np.float64).reshape(3, 3))
        pbcs.append(pbc)
        atoms += stop - start
    if not pos:
        return
    pos, cell = torch.from_numpy(np.concatenate(pos)), torch.from_numpy(np.stack(cells))
    if not (torch.isfinite(pos).all() and torch.isfinite(cell).all()):
        return  # non-finite values are the readers' to refuse
    rest = dict(batch=torch.from_numpy(np.concatenate(batch)), cell=cell, pbc=torch.from_numpy(np.stack(pbcs)),
                full=False, allow_multiple_images=True)
    found = neighbor_list(pos, float(cutoff_upper), cutoff_lower=float(cutoff_lower), **rest)
    if found.distances.numel():
        return
    shortest, probe = None, float(cutoff_upper)
    while shortest is None and probe < SHORTEST_DISTANCE_SEARCH:
        probe = min(2.0 * probe, SHORTEST_DISTANCE_SEARCH)
        found = neighbor_list(pos, probe, **rest)
        if found.distances.numel():
            shortest = float(found.distances.min())
    sample = f"{len(cells)} training structures" if len(cells) == train.size else \
        f"{len(cells)} of the {train.size} training structures (a sample)"
    if shortest is None:
        distance = f"no two atoms of {sample} of {source} are within {probe:g} Å of each other"
    else:
        distance = f"the shortest interatomic distance in {sample} of {source} is {shortest:.4g} Å"
    upper, lower = key_name("model.cutoff_upper"), key_name("model.cutoff_lower")
    if shortest is not None and shortest < cutoff_lower:
        raise ConfigError(f"{lower} is {cutoff_lower:g} Å and {upper} {cutoff_upper:g} Å, but {distance} and no "
                          "distance lies between them: the model would see no neighbours (zero forces, energies from "
                          "the composition alone); lower model.cutoff_lower")
    raise ConfigError(f"{upper} is {cutoff_upper:g} Å, but {distance}: the model would see no neighbours (zero "
                      "forces, energies from the composition alone); set model.cutoff_upper above it (5 Å is the "
                      "default)")


def label_unit_warnings(structures, source, *, energies: bool = True, forces: bool = True,
                        stress: bool = True, lengths: bool = True, length_unit: Optional[str] = None) -> list:
    """Lines for labels of ``structures`` (read from ``source``, a file name) that look like a unit or convention
    mistake: positions in another length unit (``data.length_scale``, round 39; when ``lengths``, read in
    ``length_unit``, None for the format's own), energies per atom (``data.energy_per_atom``; when ``energies``),
    forces that disagree with the energies by a factor (``data.force_consistency``; when ``forces`` and the
    structures keep forces) and a stress of the other sign or unit (``data.stress_consistency``; when ``stress``
    and the structures keep a stress). Training passes which labels it trains on (the stress whenever the data hold
    one: its validation errors are logged even at train.stress_weight 0); ``torchmdx data info`` passes
    ``forces=False, stress=False, lengths=False`` where its structures keep no positions and forces (the streamed
    summary). Nothing for no structures; the label lines nothing for no energies or fewer than two."""
    from torchmdx.data.energy_per_atom import per_atom_energy_line
    from torchmdx.data.force_consistency import force_energy_line
    from torchmdx.data.length_scale import length_unit_line
    from torchmdx.data.stress_consistency import stress_energy_line

    if structures is None:
        return []
    lines = [length_unit_line(structures, source, length_unit) if lengths else None]
    if structures.energy is not None and len(structures) >= 2:
        has_stress = isinstance(getattr(structures, "extras", None), dict) and "stress" in structures.extras
        lines += [per_atom_energy_line(structures, source) if energies else None,
                  force_energy_line(structures, source) if forces and structures.forces is not None else None,
                  stress_energy_line(structures, source) if stress and has_stress else None]
    return [line for line in lines if line]


def check_batch_limits(cfg: RunConfig, sizes: dict) -> None:
    """A fraction ``trainer.limit_train_batches`` / ``limit_val_batches`` of fewer than one batch of the split (0.01
    of 3 training batches): Lightning's MisconfigurationException traceback when training started ("You requested
    to check 0.01 of the `train_dataloader` but 0.01 * 3 < 1"), after the run folder was written (round 36).
    ``sizes``: the split's sizes. The batches are counted for this launch's processes (a run that starts more
    processes later has fewer per process: Lightning still says it there), so no run Lightning takes is refused."""
    from math import ceil

    from torchmdx.data.ranks import launch_world

    world = launch_world()
    data = cfg.data_config
    for key, part, batch_size, word, verb in (
            ("limit_train_batches", "train", data.batch_size, "training", "train on"),
            ("limit_val_batches", "val", data.inference_batch_size or data.batch_size, "validation", "validate on")):
        limit = getattr(cfg.trainer, key)
        count = int(sizes.get(part) or 0)
        if not isinstance(limit, float) or limit >= 1.0 or count == 0:
            continue
        batches = ceil(ceil(count / world) / batch_size)  # the most any process has (Lightning's per-process count)
        if int(batches * limit) == 0:
            raise ConfigError(f"{key_name('trainer.' + key)} is {limit} of the {batches} {word} batch(es) per epoch "
                              f"({count} structures, batches of {batch_size}), less than one batch (nothing to "
                              f"{verb}): give at least {ceil(1000 / batches) / 1000:g}, or a number of batches (a whole number, "
                              "e.g. 1)")
