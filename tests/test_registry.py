import pytest

from fmkit import FmkitError, Registry, hookimpl, registry


def make(*, image_size: int, channels: int, width: int = 4):
    """A fake backbone."""
    return ("made", image_size, channels, width)


def test_add_get_build_and_names():
    reg = Registry("backbone")
    reg.add("b", make, plugin="p1")
    reg.add("a", make, plugin="p1")
    assert reg.names() == ["a", "b"]
    assert "a" in reg and len(reg) == 2
    assert reg.get("a").plugin == "p1"
    assert reg.get("a").description == "A fake backbone."
    assert reg.build("a", {"width": 8}, image_size=16, channels=3) == ("made", 16, 3, 8)


def test_unknown_name_lists_available_and_closest():
    reg = Registry("backbone")
    reg.add("unet", make, plugin="p")
    with pytest.raises(FmkitError) as err:
        reg.get("unte")
    assert str(err.value) == "unknown backbone 'unte'; did you mean 'unet'? available: unet"


def test_duplicate_names_both_plugins():
    reg = Registry("solver")
    reg.add("euler", make, plugin="first-plugin")
    with pytest.raises(FmkitError, match="first-plugin.*second-plugin"):
        reg.add("euler", make, plugin="second-plugin")


def test_duplicate_across_plugins_through_hooks(register_plugin):
    class Clash:
        @hookimpl
        def register_solvers(self, register):
            register("euler", make)

    register_plugin(Clash(), "clashing-plugin")
    with pytest.raises(FmkitError) as err:
        registry("solvers")
    assert "fmkit_plugins.solvers" in str(err.value)
    assert "clashing-plugin" in str(err.value)


def test_plugin_registered_by_hook_is_found(register_plugin):
    class Fake:
        @hookimpl
        def register_backbones(self, register):
            register("fake-net", make)

    register_plugin(Fake(), "fake-plugin")
    entry = registry("backbones").get("fake-net")
    assert entry.plugin == "fake-plugin"
    assert registry("backbones").build("fake-net", {}, image_size=8, channels=1)[1] == 8


def test_hook_that_raises_is_skipped_with_a_warning(register_plugin, caplog):
    class Broken:
        @hookimpl
        def register_backbones(self, register):
            raise RuntimeError("boom")

    register_plugin(Broken(), "broken-plugin")
    reg = registry("backbones")
    assert "unet" in reg
    assert "broken-plugin" in caplog.text and "boom" in caplog.text


def test_hook_that_raises_is_fatal_in_strict_mode(register_plugin, monkeypatch):
    class Broken:
        @hookimpl
        def register_paths(self, register):
            raise RuntimeError("boom")

    register_plugin(Broken(), "broken-plugin")
    monkeypatch.setenv("FMKIT_STRICT_PLUGINS", "1")
    with pytest.raises(FmkitError, match="broken-plugin"):
        registry("paths")
