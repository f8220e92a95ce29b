"""Every hook is documented in docs/plugins.md under a heading that is its exact signature."""

import inspect
import re

import pytest
from conftest import REPO

from fmkit import hookspecs

HOOKS = [
    name
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
    if hasattr(fn, "fmkit_spec")
]


def test_hooks_found():
    assert {
        "register_backbones",
        "register_datasets",
        "register_paths",
        "register_solvers",
        "register_commands",
    } <= set(HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_section_headed_by_its_signature(hook):
    text = (REPO / "docs" / "plugins.md").read_text()
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
    headings = re.findall(r"^#+ `(.+)`\s*$", text, flags=re.M)
    assert signature in headings, f"docs/plugins.md has no heading `{signature}`"


def test_readme_mentions_every_command(run_cli):
    readme = (REPO / "README.md").read_text()
    from fmkit.cli import cli

    for command in cli.commands:
        assert f"fmkit {command}" in readme, command
