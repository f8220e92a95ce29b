import json

import pytest
from conftest import one_line_error, run_fmkit


def test_help_lists_commands(run_cli):
    result = run_cli("--help")
    assert result.exit_code == 0
    for command in ("list", "plugins", "show"):
        assert command in result.output


def test_list_solvers_and_all(run_cli):
    result = run_cli("list", "solvers")
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()]
    assert {
        "euler",
        "midpoint",
        "heun",
        "rk4",
        "dopri5",
        "dopri8",
        "bosh3",
        "adaptive_heun",
    } <= set(names)
    assert "Dormand-Prince" in result.output
    everything = run_cli("list").output
    for heading in ("backbones:", "datasets:", "paths:", "solvers:"):
        assert heading in everything
    assert "  unet" in everything and "  linear" in everything


def test_plugins_prints_builtins_as_json(run_cli):
    rows = json.loads(run_cli("plugins").output)
    by_name = {row["name"]: row for row in rows}
    assert by_name["fmkit_plugins.unet"]["hooks"] == ["register_backbones"]
    assert by_name["fmkit_plugins.solvers"]["hooks"] == ["register_solvers"]
    import fmkit

    assert by_name["fmkit_plugins.paths"]["version"] == fmkit.__version__


def test_show_reports_parameter_count(run_cli):
    result = run_cli("show", "backbones", "unet", "-o", "base_channels=128", "--image-size", "32")
    assert result.exit_code == 0
    assert "parameters: 35,746,307 (35.7M) at 32x32" in result.output
    assert "channel_mult: tuple[int, ...] = (1, 2, 2, 2)" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["show", "backbones", "unte"],
            "unknown backbone 'unte'; did you mean 'unet'? available: unet",
        ),
        (["show", "solvers", "dopri"], "did you mean 'dopri"),
        (["show", "backbones", "unet", "-o", "base_chanels=3"], "did you mean 'base_channels'?"),
        (
            ["show", "backbones", "unet", "-o", "dropout=high"],
            "option 'dropout' of backbone 'unet' expects float",
        ),
        (["show", "backbones", "unet", "-o", "nokey"], "--opt expects KEY=VALUE"),
        (
            ["show", "backbones", "unet", "--image-size", "30"],
            "image size 30 must be a multiple of 8",
        ),
        (["show", "solvers", "euler", "-o", "steps=0"], "steps must be at least 1"),
        (["show", "paths", "linear", "-o", "sigma_min=1.5"], "sigma_min must be in [0, 1)"),
    ],
)
def test_user_mistakes_are_one_line_errors(run_cli, args, message):
    result = run_cli(*args)
    assert message in one_line_error(result)


def test_console_entry_point_errors_without_traceback():
    # Autoload off: an installed third-party backbone would change the list of names.
    result = run_fmkit(
        "show", "backbones", "unte", env_extra={"FMKIT_DISABLE_PLUGIN_AUTOLOAD": "1"}
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: unknown backbone 'unte'; did you mean 'unet'? available: unet"
    ]
