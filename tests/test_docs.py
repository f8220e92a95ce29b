"""Every hook is documented in docs/writing-plugins.md under a heading that is its exact signature."""

import inspect
import re

import pytest
from conftest import REPO

from fmkit import hookspecs
from fmkit.plugins import KINDS

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
        "register_objectives",
        "register_commands",
    } <= set(HOOKS)


@pytest.mark.parametrize("kind", list(KINDS))
def test_what_fmkit_passes_each_kind_is_documented(kind):
    """The table in docs/writing-plugins.md matches fmkit.plugins.KINDS, row by row."""
    text = (REPO / "docs" / "writing-plugins.md").read_text()
    spec = KINDS[kind]
    cells = lambda names: ", ".join(f"`{n}`" for n in names) or "—"  # noqa: E731
    assert f"| {kind} | {cells(spec.fixed)} | {cells(spec.optional)} |" in text


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_has_a_section_headed_by_its_signature(hook):
    text = (REPO / "docs" / "writing-plugins.md").read_text()
    signature = f"{hook}{inspect.signature(getattr(hookspecs, hook))}"
    headings = re.findall(r"^#+ `(.+)`\s*$", text, flags=re.M)
    assert signature in headings, f"docs/writing-plugins.md has no heading `{signature}`"


def test_readme_mentions_every_command(run_cli):
    readme = (REPO / "README.md").read_text()
    from fmkit.cli import cli

    for command in cli.commands:
        assert f"fmkit {command}" in readme, command


def test_writing_plugins_walkthrough_installs_and_works(tmp_path):
    """Write the walkthrough's `# file:` blocks out, install them, and use the plugin."""
    import os
    import subprocess
    import sys

    text = (REPO / "docs" / "writing-plugins.md").read_text()
    blocks = re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S)
    package = tmp_path / "fmkit-mynet"
    files = 0
    for language, body in blocks:
        first = body.splitlines()[0]
        if first.startswith("# file: "):
            path = package / first[len("# file: ") :].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
            files += 1
        elif language == "python":
            compile(body, "writing-plugins.md", "exec")  # reference snippets must at least parse
    assert files == 3
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(package),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMKIT_") or k == "FMKIT_CACHE"}
    env.update(PYTHONPATH=str(site), FMKIT_STRICT_PLUGINS="1")
    listed = subprocess.run(
        [sys.executable, "-m", "fmkit", "list", "backbones"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert "my-net  A two-layer toy backbone; option width." in listed.stdout
    objectives = subprocess.run(
        [sys.executable, "-m", "fmkit", "list", "objectives"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "late-weighted  Flow matching weighted towards the data end" in objectives.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(package / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
