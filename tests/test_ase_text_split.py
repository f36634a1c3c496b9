"""The comment-line split that finds a key given twice (:func:`torchmdx.data.ase_text.repeated_key`) takes runs of
ordinary characters at once; it equals the character-at-a-time split it replaced (:func:`_reference`, kept here) on
random lines of every character that matters and on every comment line of the real sample files."""

import random

import pytest

from torchmdx.data.ase_text import repeated_key


def _reference(line: str):
    """repeated_key as it was (before 2026-12-07): one character at a time."""
    closing = {"'": "'", '"': '"', "{": "}", "[": "]"}
    pairs, delimiter, escaped = [[[]]], None, False
    for char in line.strip():
        if escaped:
            pairs[-1][-1].append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif delimiter:
            if char == delimiter:
                delimiter = None
            else:
                pairs[-1][-1].append(char)
        elif char in closing:
            delimiter = closing[char]
        elif char.isspace():
            if pairs[-1][-1]:
                pairs.append([[]])
        elif char == "=":
            if pairs[-1] == [[]]:
                del pairs[-1]
            if pairs:
                pairs[-1].append([])
            else:
                pairs.append([[], []])
        else:
            pairs[-1][-1].append(char)
    seen = {}
    for pair in pairs:
        if not pair or not pair[0]:
            continue
        key, value = "".join(pair[0]), "=".join("".join(x) for x in pair[1:]) if len(pair) > 1 else "T"
        if key in seen:
            return key, (seen[key], value)
        seen[key] = value
    return None


#: every character the split treats apart, whitespace of several kinds (a non-breaking space, a file separator),
#: and ordinary ones (few, so that keys repeat)
ALPHABET = list("ab=== \t\\\\'\"{}[]]}x1.") + ["\u00a0", "\x1c", "\n", "é"]


def test_random_lines_split_as_before():
    rng = random.Random(0)
    repeated = 0
    for _ in range(40000):
        line = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))
        assert repeated_key(line) == _reference(line), repr(line)
        repeated += _reference(line) is not None
    assert repeated > 200  # the lines exercise the repeated case too


@pytest.mark.parametrize("line", ['a=1 a=2', 'Lattice="1 0 0 0 1 0 0 0 1" Lattice=[1,2]', 'x="a\\"b" x=\\=',
                                  '=a a=', 'k={1 2} k="{3}"', "a='b c' a", '  e=1\\', 'q="unclosed a=1 a=2'])
def test_lines_split_as_before(line):
    assert repeated_key(line) == _reference(line)


def test_real_comment_lines_split_as_before(shared_data):
    """Every comment line of the real extxyz/xyz samples (and the same lines with a key given twice)."""
    checked = 0
    for path in [shared_data / "polymer" / "polymers_xtb.extxyz", *sorted((shared_data / "systems").glob("*.xyz"))]:
        lines = path.read_text().splitlines()
        i = 0
        while i < len(lines) and lines[i].strip():
            comment = lines[i + 1]
            assert repeated_key(comment) == _reference(comment) is None
            twice = comment + " " + comment.split()[0]
            assert repeated_key(twice) == _reference(twice) is not None
            checked += 1
            i += 2 + int(lines[i])
    assert checked > 900
