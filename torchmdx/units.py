"""The one table of unit constants.

Inside torchmdx every quantity is in ASE's units: energy eV, length Å, time fs, mass amu,
temperature K, force eV/Å. Readers convert *from* a dataset's documented unit *to* these with
the factors below (multiply a value in the named unit by the factor to get the internal unit).

Values are those of ``ase.units`` (CODATA 2014, ASE's default), written out so that a reader or a
test can check a conversion by hand, and so that torchmdx and ASE never disagree in the last digit.
"""

# --- energy -> eV -----------------------------------------------------------------------------
HARTREE_TO_EV = 27.211386024367243          # 1 Eh in eV
RYDBERG_TO_EV = 13.605693012183622          # 1 Ry = Eh / 2 in eV (Quantum ESPRESSO's energy unit; ase.units.Rydberg)
KCAL_PER_MOL_TO_EV = 0.04336410390059322  # 1 kcal/mol in eV  (= 4184 J / (N_A * e))
KJ_PER_MOL_TO_EV = 0.010364269574711572  # 1 kJ/mol in eV
MEV_TO_EV = 1.0e-3
EV_TO_MEV = 1.0e3  # the other way: error tables are reported in meV
EV_TO_EV = 1.0
EV_TO_KJ_PER_MOL = 96.48533288249877  # 1 eV in kJ/mol (= 1 / KJ_PER_MOL_TO_EV; OpenMM's energy unit)

# --- length -> Å --------------------------------------------------------------------------------
BOHR_TO_ANGSTROM = 0.5291772105638411        # 1 a0 in Å
NM_TO_ANGSTROM = 10.0
ANGSTROM_TO_NM = 0.1  # OpenMM's length unit

# --- dipole -> e·Å --------------------------------------------------------------------------------
DEBYE_TO_E_ANGSTROM = 0.20819433442462576  # 1 D in e·Å

# --- thermodynamics / dynamics -------------------------------------------------------------------
BOLTZMANN_EV_PER_K = 8.617330337217213e-05      # k_B in eV/K
# ASE's time unit: 1 fs = FS_TO_ASE_TIME in units of Å·sqrt(amu/eV).
# With E in eV, m in amu and x in Å, the natural time unit is Å·sqrt(amu/eV) = 10.1805 fs.
FS_TO_ASE_TIME = 0.09822694788464063
# acceleration: F/m in eV/(Å·amu) -> Å/fs²  (= FS_TO_ASE_TIME²)
EV_PER_A_AMU_TO_A_PER_FS2 = FS_TO_ASE_TIME ** 2
# pressure: eV/Å³ -> GPa and bar
EV_PER_A3_TO_GPA = 160.21766208
EV_PER_A3_TO_BAR = 1.6021766208e6
# density: amu/Å³ -> g/cm³ (1 amu = 1.66053904e-24 g, 1 Å³ = 1e-24 cm³; ase.units._amu)
AMU_PER_A3_TO_G_PER_CM3 = 1.66053904

#: energy units by the names datasets use for them (lower case), factor to eV
ENERGY_UNITS = {
    "ev": EV_TO_EV,
    "mev": MEV_TO_EV,
    "hartree": HARTREE_TO_EV,
    "ha": HARTREE_TO_EV,
    "eh": HARTREE_TO_EV,
    "ry": RYDBERG_TO_EV,
    "rydberg": RYDBERG_TO_EV,
    "kcal/mol": KCAL_PER_MOL_TO_EV,
    "kj/mol": KJ_PER_MOL_TO_EV,
}

#: length units by name, factor to Å
LENGTH_UNITS = {
    "ang": 1.0,
    "angstrom": 1.0,
    "å": 1.0,
    "a": 1.0,
    "bohr": BOHR_TO_ANGSTROM,
    "a0": BOHR_TO_ANGSTROM,
    "nm": NM_TO_ANGSTROM,
}


def energy_factor(unit: str) -> float:
    """Factor converting an energy given in ``unit`` (e.g. 'Hartree', 'kcal/mol') to eV."""
    from torchmdx.errors import DataError

    if not isinstance(unit, str):  # energy_unit=5 was AttributeError: 'int' object has no attribute 'strip'
        raise DataError(f"energy unit {unit!r} is not a unit name (text such as 'kcal/mol')")
    key = unit.strip().lower()
    if key not in ENERGY_UNITS:
        raise DataError(f"unknown energy unit {unit!r}; known: {', '.join(sorted(ENERGY_UNITS))}")
    if key == "mev" and unit.strip() not in ("meV", "mev"):
        # names are matched without case, but M (mega) and m (milli) differ by 10^9: 'MeV' was read as meV
        raise DataError(f"energy unit {unit!r} is ambiguous: milli-electronvolt is 'meV' (mega-electronvolts are not "
                        "a unit of molecular data)")
    return ENERGY_UNITS[key]


def length_factor(unit: str) -> float:
    """Factor converting a length given in ``unit`` (e.g. 'Bohr') to Å."""
    from torchmdx.errors import DataError

    if not isinstance(unit, str):  # length_unit=5 was AttributeError: 'int' object has no attribute 'strip'
        raise DataError(f"length unit {unit!r} is not a unit name (text such as 'Bohr')")
    key = unit.strip().lower()
    if key not in LENGTH_UNITS:
        raise DataError(f"unknown length unit {unit!r}; known: {', '.join(sorted(LENGTH_UNITS))}")
    return LENGTH_UNITS[key]
