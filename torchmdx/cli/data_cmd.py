"""``torchmdx data``: inspect a dataset (``info``), build its HDF5 cache (``prepare``), or remove
old caches (``clean``).

    torchmdx data info <config.yaml | data file> [--format F] [--json] [--energy-key K]
                       [--forces-key K] [--stress-key K] [--group-key K] [--energy-unit U] [--length-unit U]
    torchmdx data prepare <config.yaml | data file> [same options] [--cache-dir DIR] [--force]
    torchmdx data clean [CACHE_DIR] [--dry-run]

``info`` reads a current cache when one exists and the raw file otherwise; it writes nothing.
With a config it also shows the split the config would make (sizes; a split larger than the
data is an error; ``data.split_file`` is read and checked as training does, a split file made from
other content a warning line) and, for ``atomref: fit``, the fitted per-element reference energies.

``clean`` removes from a cache folder (default ``data/cache``) the caches made by another cache
version, damaged ones, those whose source no longer exists and the leftovers of interrupted
builds (:func:`torchmdx.data.cache.removable_cache_files`); files without the cache marker are
never touched, and ``--dry-run`` only lists.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HELP = "inspect a dataset (info), build its cache (prepare) or remove old caches (clean)"

#: the cache folder of the data commands when neither --cache-dir nor a config names one
#: (DataConfig.cache_dir's default)
DEFAULT_CACHE_DIR = "data/cache"

_FORMATS = ("md17", "rmd17", "md17-xyz", "qm9", "ani1", "ani1x", "ase", "cache")


def _common(p):
    p.add_argument("source", help="a data file or folder, an md17 molecule name, or a YAML config with a data: section")
    p.add_argument("--format", default=None, metavar="FORMAT",
                   help=f"file format, one of {', '.join(_FORMATS)} (guessed from the file if absent)")
    p.add_argument("--energy-key", default=None,
                   help="energy key (ASE info key, QM9 property, ANI-1x e.g. wb97x_dz.energy)")
    p.add_argument("--forces-key", default=None, help="forces key (ASE array, ANI-1x e.g. wb97x_dz.forces)")
    p.add_argument("--stress-key", default=None, help="stress key of an ASE file (default stress, else a virial)")
    p.add_argument("--group-key", default=None, help="ASE info key holding each structure's group label")
    p.add_argument("--energy-unit", default=None, help="energy unit of the file (e.g. kcal/mol, Hartree, eV)")
    p.add_argument("--length-unit", default=None, help="length unit of the file (e.g. Bohr, Å)")
    p.add_argument("--cache-dir", default=None, help=f"cache folder (default: the config's, else {DEFAULT_CACHE_DIR})")


def add_arguments(parser):
    sub = parser.add_subparsers(dest="data_command", metavar="action")
    info = sub.add_parser("info", help="print a summary: structures, atoms, elements, energy and force statistics",
                          description="Summary of a dataset in eV and eV/Å.")
    _common(info)
    info.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    prepare = sub.add_parser("prepare", help="build (or check) the HDF5 cache and print its path",
                             description="Build the HDF5 cache of a dataset (only when the raw file changed).")
    _common(prepare)
    prepare.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    clean = sub.add_parser("clean", help="remove old, damaged and orphaned cache files",
                           description="Remove from a cache folder the caches made by another cache version, "
                                       "damaged ones, those whose source no longer exists, and the leftovers of "
                                       "interrupted builds. Files that are not torchmdx caches are never touched.")
    clean.add_argument("cache_dir", nargs="?", default=None, help=f"the cache folder (default: {DEFAULT_CACHE_DIR})")
    # data info and prepare take the folder as --cache-dir: `data clean --cache-dir d` was "unrecognized
    # arguments: --cache-dir" (d taken as the folder), saying nothing of the positional folder
    clean.add_argument("--cache-dir", dest="cache_dir_option", metavar="CACHE_DIR",
                       help="the cache folder, as data info and prepare take it (the same as the argument)")
    clean.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    parser.set_defaults(_data_parser=parser)


def _is_config(source: str) -> bool:
    return Path(source).suffix.lower() in (".yaml", ".yml")


def _load(args):
    """(DataConfig or None, source, format, reader options, cache_dir) from the arguments."""
    from torchmdx.data.data_config import DataConfig, load_data_config

    from torchmdx.errors import ConfigError

    if args.cache_dir is not None and not args.cache_dir.strip():  # '' meant the default folder, silently
        raise ConfigError(f"--cache-dir is empty ({args.cache_dir!r}); give a folder, or leave it out for the "
                          "config's (else data/cache)")
    cli_opts = {"energy_key": args.energy_key, "forces_key": args.forces_key, "stress_key": args.stress_key,
                "group_key": args.group_key,
                "energy_unit": args.energy_unit, "length_unit": args.length_unit}
    from torchmdx.data.data_config import check_unit_names, empty_text_line

    for key, value in cli_opts.items():
        line = empty_text_line("--" + key.replace("_", "-"), key, value)
        if line:
            raise ConfigError(line)
    check_unit_names(cli_opts, lambda key: "--" + key.replace("_", "-"))  # before a cache folder is made
    if _is_config(args.source):
        config = load_data_config(args.source)
        for key, value in cli_opts.items():
            if value is not None:
                setattr(config, key, value)
        if args.format:
            config.format = args.format
        if args.cache_dir:
            config.cache_dir = args.cache_dir
    else:
        config = DataConfig(path=args.source, format=args.format, cache_dir=args.cache_dir or DEFAULT_CACHE_DIR, **cli_opts)
    # a file there: `data info --cache-dir FILE` was taken without a word (it only looks for a cache), and
    # `data prepare` said so only after reading the whole data set
    folder = Path(config.cache_dir)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "--cache-dir" if args.cache_dir else f"config key 'data.cache_dir' in {args.source}:"
        raise ConfigError(f"{where} {folder}: {blocker} is a file, not a folder; give the cache folder (a "
                          f"folder, or one to be made)")
    return config


def run(args) -> int:
    if getattr(args, "data_command", None) is None:
        args._data_parser.print_help()
        return 1
    if args.data_command == "clean":
        return _clean(args)
    config = _load(args)
    if args.data_command == "prepare":
        return _prepare(args, config)
    return _info(args, config)


def _prepare(args, config) -> int:
    from torchmdx.data.cache import build_cache, find_cache

    opts = config.reader_options()
    current = None if args.force else find_cache(config.path, config.format, config.cache_dir, **opts)
    path = current or build_cache(config.path, config.format, config.cache_dir, force=args.force, **opts)
    if not current and Path(path).resolve() == Path(config.path).resolve():
        print(f"already a torchmdx cache: {path}")
        return 0
    print(f"{'cache is current' if current else 'cache written'}: {path}")
    return 0


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _clean(args) -> int:
    import contextlib
    import shutil

    from torchmdx.data.cache import removable_cache_files, size_of
    from torchmdx.errors import DataError

    option = getattr(args, "cache_dir_option", None)
    if option is not None and args.cache_dir is not None and Path(option) != Path(args.cache_dir):
        raise DataError(f"data clean got two cache folders, {args.cache_dir} and --cache-dir {option}; give one")
    given = option if option is not None else args.cache_dir
    if given is not None and not given.strip():  # an unset shell variable: was the current folder, '.'
        raise DataError(f"{'--cache-dir' if option is not None else 'the cache folder'} is empty ({given!r}); give "
                        f"the cache folder, or leave it out for {DEFAULT_CACHE_DIR}")
    folder = Path(given if given is not None else DEFAULT_CACHE_DIR)
    if not folder.exists():
        raise DataError(f"{folder}: no such cache folder")
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder (give the cache folder: torchmdx data clean CACHE_DIR)")
    found = removable_cache_files(folder)
    freed = 0
    for path, why in found:
        size = size_of(path)
        if not args.dry_run:
            with contextlib.suppress(FileNotFoundError):  # gone meanwhile (another clean)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        freed += size
        print(f"{'would remove' if args.dry_run else 'removed'} {path} ({_size(size)}): {why}")
    if not found:
        print(f"nothing to remove in {folder}")
    elif args.dry_run:
        print(f"{len(found)} file(s) would be removed, freeing {_size(freed)} (dry run: nothing removed)")
    else:
        print(f"removed {len(found)} file(s), freed {_size(freed)}")
    sys.stdout.flush()
    return 0


def _refuse_damaged_cache(config, opts) -> None:
    """``data info`` builds nothing: a cache under the source's cache name that does not match its
    checksums (torchmdx.data.cache.damage) is named in one line rather than passed over."""
    from torchmdx.data.cache import cache_path, damage
    from torchmdx.errors import DataError

    path = cache_path(config.path, config.format, config.cache_dir, **opts)
    problem = damage(path) if path.is_file() else ""
    if problem:
        raise DataError(f"{path}: this cache is damaged {problem}; build it again (torchmdx data prepare --force)")


def _info(args, config) -> int:
    from torchmdx.data.cache import find_cache, read_cache
    from torchmdx.data.summary import format_summary, summarize
    from torchmdx.data.summary_stream import summary_structures

    opts = config.reader_options()
    cached = find_cache(config.path, config.format, config.cache_dir, **opts)
    if cached is None:
        _refuse_damaged_cache(config, opts)
        # no cache: one streamed pass keeps the per-structure arrays and the statistics (was the whole read)
        structures, force_problem = summary_structures(config.path, config.format, **opts)
    else:
        structures, force_problem = read_cache(cached, mmap=True), None
    summary = summarize(structures)
    if _is_config(args.source):
        summary.update(_config_part(structures, config, cached))
    problem = _label_problem(structures, config, force_problem, checked_forces=cached is None)
    if problem is not None:
        summary["label_problem"] = problem
    # the lines train warns with; the forces' and the stress's lines need positions, which only a cache keeps (the
    # streamed summary keeps none: data prepare or a training run first)
    from torchmdx.train.data_checks import label_unit_warnings

    label_notes = label_unit_warnings(structures, Path(str(config.path)).name, forces=cached is not None,
                                      stress=cached is not None, lengths=cached is not None,
                                      length_unit=config.length_unit)
    if label_notes:  # energies per atom, forces or stress in other units than the energies: trained silently
        summary["label_warnings"] = label_notes
    if args.json:
        print(json.dumps(summary, indent=None))
    else:
        print(format_summary(summary))
        if summary.get("atomic_references_note"):
            print(f"{'note':<13}{summary['atomic_references_note']}")
        for line in label_notes:
            print(f"{'note':<13}{line}")
    sys.stdout.flush()
    if problem is not None:  # the summary stays useful; the problem is the one error line
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0


def _label_problem(structures, config, force_problem=None, checked_forces: bool = False) -> str | None:
    """What training would refuse in the labels (torchmdx.data.label_check: an energy or force
    far beyond physical), as its one line; None when they pass or ``data.check_labels`` is false.
    ``checked_forces``: the forces were checked while the file was streamed (``force_problem``, the line for
    the first force beyond physical, or None): the summary's structures keep no forces."""
    from torchmdx.data.label_check import check_labels
    from torchmdx.errors import DataError

    if getattr(config, "check_labels", None) is False or structures.energy is None:
        return None
    if force_problem is not None:  # the check's first item, as check_labels would name it
        return force_problem
    try:
        check_labels(structures, check_forces=not checked_forces)
    except DataError as exc:
        return str(exc)
    return None


def _data_hash(config, cached) -> str:
    """The content hash training compares a split file's with (the data module's
    ``dataset.info['fingerprint']['hash']``): the one a cache recorded of its source, else the source's."""
    from torchmdx.data.cache import cache_info, content_hash
    from torchmdx.data.formats import check_format, guess_format, resolve_source

    if cached is None:
        fmt = check_format(config.format)
        src = resolve_source(config.path, fmt)
        if (fmt or guess_format(src)) != "cache":
            return content_hash(src)
        cached = src  # the data path is a torchmdx cache itself
    return str((cache_info(cached).get("fingerprint") or {}).get("hash", ""))


def _config_part(structures, config, cached=None) -> dict:
    """Split sizes, element range check and atomic references for a config's data section."""
    from torchmdx.data.atomref import (fit_atomic_references, given_references, published_atomic_references,
                                       untrained_elements)
    from torchmdx.data.splits import load_split, make_split

    structures.check_max_z(config.max_z)
    # the split training uses: data.split_file when given (a fresh split was shown, its sizes and atom references
    # fitted on other structures than training's), checked as training checks it (its size, and its content hash:
    # a split made for another data set of as many structures is a warning line, as in training)
    if config.split_file:
        split = load_split(config.split_file, len(structures), _data_hash(config, cached))
    else:
        split = make_split(structures, config)
    sizes = split.sizes()
    sizes["unused"] = len(structures) - sum(sizes.values())
    if split.info.get("groups"):
        sizes["groups"] = split.info["groups"]
    out = {"split": sizes, "max_z": config.max_z}
    refs = None
    if config.atomref == "fit" and len(split.train):
        refs = fit_atomic_references(structures, split.train, config.max_z)
    elif config.atomref == "dataset":
        refs = published_atomic_references(structures, config.max_z)
    elif isinstance(config.atomref, dict):
        refs = given_references(structures, config.atomref, config.max_z, config.path)
    if refs is not None:
        out["atomic_references_eV"] = {str(z): float(refs[z]) for z in structures.elements}
        if config.atomref == "fit":
            note = _reference_rank_note(structures, split.train)
            if note:
                out["atomic_references_note"] = note
    # an element only in the validation/test part (a split by group): "energies are unaffected" was the note
    untrained = untrained_elements(structures, split.train, config.max_z, Path(str(config.path)).name)
    if untrained:
        out["untrained_elements"] = untrained
        out["atomic_references_note"] = untrained
    return out


def _reference_rank_note(structures, indices) -> str | None:
    """What the fit cannot tell apart: with fewer independent compositions than elements (one
    molecule's MD frames: one composition), only combinations of the per-element references are
    determined; the fit shows the minimum-norm solution. None when every element is determined."""
    import numpy as np

    indices = np.asarray(indices, dtype=np.int64)
    elements = sorted(int(e) for e in structures.elements)
    offsets = np.asarray(structures.offsets, dtype=np.int64)
    column = {z: k for k, z in enumerate(elements)}
    counts = np.zeros((len(indices), len(elements)))
    z = np.asarray(structures.z)
    for row, i in enumerate(indices[:20000]):  # enough rows to find the compositions
        values, number = np.unique(z[offsets[i]:offsets[i + 1]], return_counts=True)
        counts[row, [column[int(v)] for v in values]] = number
    compositions = len({tuple(r) for r in counts.astype(np.int64).tolist()})
    rank = int(np.linalg.matrix_rank(counts)) if len(indices) else 0
    if rank >= len(elements):
        return None
    return (f"{compositions} composition(s) in the training split for {len(elements)} elements: only "
            f"{rank} combination(s) of the per-element references are determined (minimum-norm fit shown); "
            "energies are unaffected, per-element values are not meaningful")
