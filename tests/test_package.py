"""Packaging: the built wheel carries and loads the built-in plugins; lint; CI runs the README."""

import os
import re
import subprocess
import sys
import zipfile

from conftest import REPO


def test_built_wheel_contains_and_loads_builtin_plugins(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("fmkit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("unet", "paths", "solvers"):
        assert f"fmkit_plugins/{module}.py" in names
    assert not any(n.startswith("plugins/") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    # Import from the unpacked wheel, not from the source tree or the editable install.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FMKIT_") or k == "FMKIT_CACHE"}
    env["PYTHONPATH"] = str(site)
    code = (
        "import fmkit, fmkit_plugins, sys; from fmkit.cli import main;"
        "print(fmkit.__file__); print(fmkit_plugins.__file__); sys.argv = ['fmkit', 'list'];"
        "main()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(str(site)) and lines[1].startswith(str(site))
    assert "  unet" in out.stdout and "  dopri5" in out.stdout and "  linear" in out.stdout


def test_ruff_lint_and_format():
    check = subprocess.run(
        [sys.executable, "-m", "ruff", "check", str(REPO)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", str(REPO)],
        capture_output=True,
        text=True,
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    (command,) = re.findall(r"^TEST_COMMAND='(.+)'$", ci, flags=re.M)
    assert f"\n{command}\n" in readme
