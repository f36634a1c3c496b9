"""The wording helpers of ``torchmdx.errors`` that error lines are built with."""

import pytest

from torchmdx.errors import requested_gigabytes, with_article


@pytest.mark.parametrize("noun, expected", [
    ("model file", "a model file"),
    ("energy", "an energy"),
    ("OpenMM module", "an OpenMM module"),
    ("MD restart file", "an MD restart file"),   # "em-dee": an initialism read letter by letter
    ("HDF5 file", "an HDF5 file"),
    ("TorchScript file", "a TorchScript file"),  # a word, not an initialism
    ("checkpoint", "a checkpoint"),
    ("length", "a length"),
])
def test_with_article_follows_the_first_sound(noun, expected):
    assert with_article(noun) == expected


def test_requested_gigabytes_reads_torchs_allocation_message():
    assert requested_gigabytes("DefaultCPUAllocator: can't allocate memory: you tried to allocate 2500000000 bytes") == 2.5
    assert requested_gigabytes("out of memory") is None
