"""Shared fixtures. Installed third-party plugins never leak into tests: autoload is off for the
test process, and tests that need a plugin register it in a fixture."""

import os
import sys
import tempfile
import textwrap
from pathlib import Path

os.environ["FMKIT_DISABLE_PLUGIN_AUTOLOAD"] = "1"
# pytest-xdist runs one worker per core (pyproject.toml): each worker's torch, and every
# process it starts, computes on one thread, or the workers' thread pools oversubscribe the
# cores (set before torch is imported).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Decoded-dataset caches and FID statistics go to a directory of this test session's own.
os.environ["FMKIT_CACHE"] = tempfile.mkdtemp(prefix="fmkit-test-cache-")

import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from fmkit.cli import cli  # noqa: E402
from fmkit.plugins import add_commands, pm  # noqa: E402

add_commands(cli)  # plugin subcommands (e.g. `prepare imagenet`), as the console script does

REPO = Path(__file__).resolve().parents[1]

# A UNet small enough for tests to train in seconds on the CPU (flags for `fmkit train`).
TINY = [
    "--backbone-opt",
    "base_channels=8",
    "--backbone-opt",
    "channel_mult=1,2",
    "--backbone-opt",
    "attn_resolutions=8",
    "--backbone-opt",
    "num_res_blocks=1",
]


@pytest.fixture
def faces(tmp_path):
    """24 solid-colour 20x20 PNGs: the folder most CLI training tests train on."""
    root = tmp_path / "faces"
    for i in range(24):
        write_image(root / f"{i:02d}.png", size=(20, 20), color=(i * 10, 100, 255 - i * 10))
    return root


def train_args(faces, out, *extra):
    """`fmkit train` on `faces` at 16x16, batch 4, with the tiny UNet and small grids, at a
    constant learning rate: tests stop a run with a small --max-steps and resume it with a
    larger one, which moves where a decay ends (test_watched_run tries the schedules)."""
    return [
        "train", "--dataset", "folder", "--data-dir", faces, "--image-size", 16,
        "--batch-size", 4, "--num-samples", 4, "--sample-steps", 3, "--log-every", 1,
        "--lr-schedule", "constant", "--output", out, *TINY, *extra,
    ]  # fmt: skip


@pytest.fixture
def register_plugin():
    """register_plugin(obj, name): add a plugin object for one test, removed afterwards."""
    names = []

    def register(obj, name):
        pm.register(obj, name=name)
        names.append(name)
        return obj

    try:
        yield register
    finally:
        for name in names:
            pm.unregister(name=name)


@pytest.fixture
def run_cli():
    """run_cli(*args) -> click Result of the fmkit group (in process)."""

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return run


def benchmark(name: str):
    """The script benchmarks/NAME.py as a module; its folder goes on sys.path, as it is when a
    benchmark runs, so the scripts find each other by name."""
    import importlib

    folder = str(REPO / "benchmarks")
    if folder not in sys.path:
        sys.path.append(folder)
    return importlib.import_module(name)


# Lines that may precede an error without being part of it: a run's start-up summary
# (fmkit.progress) and notes ("note: ..."), which say something true that is not a mistake.
STARTUP = ("model: ", "data: ", "device: ", "output: ", "resumed from ", "note: ")


def one_line_error(result) -> str:
    """Assert a CLI result failed with exactly one error line and no traceback; return it."""
    output = result.output if hasattr(result, "output") else result
    assert result.exit_code != 0, output
    assert "Traceback" not in output, output
    # Progress-bar lines (tqdm, "%|") and STARTUP lines may precede the error.
    lines = [
        line
        for line in output.splitlines()
        if line.strip() and "%|" not in line and not line.startswith(STARTUP)
    ]
    assert len(lines) == 1, output
    assert lines[0].startswith("Error: "), output
    return lines[0]


def make_plugin_distribution(root: Path, dist: str, module: str, body: str, version="1.2.3"):
    """Write an installed-looking distribution (module + .dist-info with entry_points.txt naming
    group `fmkit`) under `root`, which can then go on sys.path / PYTHONPATH."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(body))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[fmkit]\n{dist} = {module}\n")
    return root


def run_fmkit(*args, env_extra=None, cwd=None):
    """Run `python -m fmkit ARGS` in a subprocess with plugin autoload on."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("FMKIT_") or k == "FMKIT_CACHE"}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "fmkit", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def small_faces(root: Path, count: int = 8) -> Path:
    """`count` solid-colour 16x16 PNGs in `root`: for module-scoped fixtures that train once."""
    for i in range(count):
        write_image(root / f"{i}.png", size=(16, 16), color=(i * 30, 90, 200))
    return root


def write_image(path: Path, size=(20, 16), color=(200, 30, 30), mode="RGB", fmt=None):
    """Write a solid-colour image (any PIL mode) and return its path."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, color).convert(mode)
    image.save(path, format=fmt)
    return path
