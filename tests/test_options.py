from typing import Literal

import pytest

from fmkit import FmkitError, parse_options
from fmkit.options import check_options


def factory(
    *,
    image_size: int,
    steps: int = 10,
    rtol: float = 1e-5,
    mult: tuple[int, ...] = (1, 2),
    flip: bool = True,
    split: Literal["train", "valid"] = "train",
    name: str = "x",
    extra: int | None = None,
):
    return None


def test_parse_literals_and_bare_strings():
    got = parse_options(
        ["steps=10", "rtol=1e-4", "mult=1,2,2", "split=train", "q='a=b'", "n=None", "s = 3 "],
        "--opt",
    )
    assert got == {
        "steps": 10,
        "rtol": 1e-4,
        "mult": (1, 2, 2),
        "split": "train",
        "q": "a=b",
        "n": None,
        "s": 3,
    }


def test_parse_never_evaluates_code(tmp_path):
    marker = tmp_path / "pwned"
    value = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    got = parse_options([f"x={value}"], "--opt")
    assert got == {"x": value}
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["steps", "=3", "two words=1"])
def test_parse_rejects_malformed(bad):
    with pytest.raises(FmkitError, match="--backbone-opt expects KEY=VALUE"):
        parse_options([bad], "--backbone-opt")


def test_check_converts_to_annotated_types():
    got = check_options(
        factory,
        {"rtol": 1, "mult": 16, "flip": "false", "split": "valid", "extra": 3},
        "thing 'f'",
        {"image_size": 8},
    )
    assert got == {"rtol": 1.0, "mult": (16,), "flip": False, "split": "valid", "extra": 3}


@pytest.mark.parametrize(
    "options, message",
    [
        ({"stepz": 3}, "unknown option 'stepz' for thing 'f'; did you mean 'steps'?"),
        ({"steps": 2.5}, "option 'steps' of thing 'f' expects int, got 2.5"),
        ({"steps": True}, "option 'steps' of thing 'f' expects int"),
        ({"mult": (1, "a")}, "option 'mult' of thing 'f' expects tuple[int, ...]"),
        ({"split": "tset"}, "option 'split' of thing 'f' expects 'train' | 'valid'"),
        ({"name": 3}, "option 'name' of thing 'f' expects str"),
        ({"image_size": 3}, "option 'image_size' of thing 'f' is set by fmkit itself"),
    ],
)
def test_check_rejects_bad_options(options, message):
    with pytest.raises(FmkitError) as err:
        check_options(factory, options, "thing 'f'", {"image_size": 8})
    assert message in str(err.value)
