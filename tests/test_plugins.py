"""Third-party plugins found through the `fmkit` entry-point group of installed distributions."""

import json

from conftest import make_plugin_distribution, run_fmkit

GOOD = """
import torch
from fmkit import hookimpl

class MyNet(torch.nn.Module):
    def __init__(self, channels, width):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        self.width = width

    def forward(self, x, t):
        return self.conv(x)

def my_net(*, image_size: int, channels: int, width: int = 4):
    '''A one-layer test backbone.'''
    return MyNet(channels, width)

@hookimpl
def register_backbones(register):
    register("my-net", my_net)
"""


def test_installed_distribution_is_listed_and_buildable(tmp_path):
    site = make_plugin_distribution(tmp_path / "site", "fmkit-mynet", "fmkit_mynet", GOOD)
    env = {"PYTHONPATH": str(site)}
    listed = run_fmkit("list", "backbones", env_extra=env)
    assert listed.returncode == 0, listed.stderr
    assert "my-net" in listed.stdout and "A one-layer test backbone." in listed.stdout
    assert "unet" in listed.stdout

    plugins = json.loads(run_fmkit("plugins", env_extra=env).stdout)
    row = next(p for p in plugins if p["name"] == "fmkit-mynet")
    assert row == {"name": "fmkit-mynet", "version": "1.2.3", "hooks": ["register_backbones"]}

    shown = run_fmkit(
        "show", "backbones", "my-net", "-o", "width=8", "--image-size", "16", env_extra=env
    )
    assert shown.returncode == 0, shown.stderr
    assert "parameters: 12 " in shown.stdout  # 3x3 1x1 conv weights + 3 biases

    # The factory is reachable by name from Python too, called as the contract says.
    code = (
        "import torch; from fmkit import registry;"
        "m = registry('backbones').get('my-net').factory(image_size=16, channels=3);"
        "print(tuple(m(torch.zeros(2, 3, 16, 16), torch.zeros(2)).shape))"
    )
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(env), timeout=120
    )
    assert out.stdout.strip() == "(2, 3, 16, 16)", out.stderr


def _env(extra):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FMKIT_") or k == "FMKIT_CACHE"}
    env.update(extra)
    return env


def test_plugin_whose_import_raises_is_skipped_with_one_warning(tmp_path):
    site = make_plugin_distribution(
        tmp_path / "site",
        "fmkit-broken",
        "fmkit_broken",
        "raise ImportError('needs libfoo')\n",
        "0.4",
    )
    result = run_fmkit("list", "solvers", env_extra={"PYTHONPATH": str(site)})
    assert result.returncode == 0
    assert "dopri5" in result.stdout
    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, result.stderr
    assert "fmkit-broken 0.4" in warnings[0] and "needs libfoo" in warnings[0]


def test_strict_mode_makes_a_broken_plugin_fatal(tmp_path):
    site = make_plugin_distribution(
        tmp_path / "site", "fmkit-broken", "fmkit_broken", "1 / 0\n", "0.4"
    )
    env = {"PYTHONPATH": str(site), "FMKIT_STRICT_PLUGINS": "1"}
    result = run_fmkit("list", "solvers", env_extra=env)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "fmkit-broken 0.4" in result.stderr and "ZeroDivisionError" in result.stderr


def test_autoload_can_be_disabled(tmp_path):
    site = make_plugin_distribution(tmp_path / "site", "fmkit-mynet", "fmkit_mynet", GOOD)
    env = {"PYTHONPATH": str(site), "FMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    result = run_fmkit("list", "backbones", env_extra=env)
    assert result.returncode == 0
    assert "my-net" not in result.stdout and "unet" in result.stdout


def test_duplicate_name_from_a_distribution_names_both(tmp_path):
    body = GOOD.replace('"my-net"', '"unet"')
    site = make_plugin_distribution(tmp_path / "site", "fmkit-clash", "fmkit_clash", body)
    result = run_fmkit("list", "backbones", env_extra={"PYTHONPATH": str(site)})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "fmkit_plugins.unet" in result.stderr and "fmkit-clash" in result.stderr
