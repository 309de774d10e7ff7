"""Plugin discovery through the `t2l` entry-point group."""

import sys

import pytest

from t2l_framework.assembly import load_recipe
from t2l_framework.errors import T2LError
from t2l_framework.plugins import manager
from tests.plugin_factory import BROKEN_PLUGIN, CLASHING_PLUGIN, GOOD_PLUGIN, make_plugin


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("T2L_PLUGINS", raising=False)
    yield site
    monkeypatch.undo()  # drop the fake plugins from sys.path before reloading
    manager.registry(reload=True)  # later tests get the registry without the fake plugins
    for name in ("t2l_fake_plugin", "t2l_broken_plugin", "t2l_clash_plugin"):
        sys.modules.pop(name, None)


def test_builtins_register_every_kind():
    reg = manager.registry(reload=True)
    assert {"per_layer", "shared", "chunked"} <= set(reg.names("heads"))
    assert {"transformers", "sentence_transformers"} <= set(reg.names("encoders"))
    assert {"llama", "mistral", "gemma", "qwen"} <= set(reg.names("base_models"))
    builtin = reg.plugins[0]
    assert builtin.name == "builtin" and builtin.source == "built-in"


def test_entry_point_plugin_is_discovered_and_usable_in_a_recipe(site, tmp_path):
    make_plugin(site, "t2l-fake-plugin", "t2l_fake_plugin", GOOD_PLUGIN, entry_name="fake")
    reg = manager.registry(reload=True)
    assert "fake_encoder" in reg.names("encoders")
    info = next(p for p in reg.plugins if p.name == "fake")
    assert info.version == "1.0" and info.source.startswith("entry point")
    assert info.registered == {"encoders": ["fake_encoder"]}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("encoder:\n  name: fake_encoder\n")
    cfg = load_recipe(recipe, check_files=False)
    assert cfg.encoder.name == "fake_encoder"


def test_broken_plugin_is_reported_once_and_others_keep_working(site, capsys):
    make_plugin(site, "t2l-fake-plugin", "t2l_fake_plugin", GOOD_PLUGIN, entry_name="fake")
    make_plugin(site, "t2l-broken-plugin", "t2l_broken_plugin", BROKEN_PLUGIN, entry_name="broken")
    reg = manager.registry(reload=True)
    err = capsys.readouterr().err
    assert err.count("plugin 'broken' failed to load") == 1
    assert "broken on purpose" in err
    assert "fake_encoder" in reg.names("encoders") and "per_layer" in reg.names("heads")
    broken = next(p for p in reg.plugins if p.name == "broken")
    assert "ImportError" in broken.error


def test_t2l_plugins_env_limits_what_loads(site, monkeypatch):
    make_plugin(site, "t2l-fake-plugin", "t2l_fake_plugin", GOOD_PLUGIN, entry_name="fake")
    make_plugin(site, "t2l-broken-plugin", "t2l_broken_plugin", BROKEN_PLUGIN, entry_name="broken")
    monkeypatch.setenv("T2L_PLUGINS", "fake")
    reg = manager.registry(reload=True)
    assert [p.name for p in reg.plugins] == ["builtin", "fake"]
    monkeypatch.setenv("T2L_PLUGINS", "")
    reg = manager.registry(reload=True)
    assert [p.name for p in reg.plugins] == ["builtin"]
    assert "fake_encoder" not in reg.names("encoders")


def test_registering_a_name_twice_names_both_plugins(site):
    make_plugin(site, "t2l-clash-plugin", "t2l_clash_plugin", CLASHING_PLUGIN, entry_name="clash")
    with pytest.raises(T2LError, match="'transformers' is registered twice: by plugin 'builtin' and by plugin 'clash'"):
        manager.registry(reload=True)


def test_unknown_plugin_name_suggests_close_match():
    reg = manager.registry(reload=True)
    with pytest.raises(T2LError, match="unknown head 'per_layr'.*did you mean 'per_layer'"):
        reg.get("heads", "per_layr")


HALF_BROKEN_PLUGIN = """
from t2l_framework import hookimpl
from t2l_framework.hypernet import PerLayerHead


class HalfHead(PerLayerHead):
    pass


@hookimpl
def t2l_register_encoders(register):
    register("half_encoder", lambda cfg: None)


@hookimpl
def t2l_register_heads(register):
    register("half_head", HalfHead)


@hookimpl
def t2l_register_base_models(register):
    register("half_family", object())
    raise RuntimeError("fails after three registrations")
"""


def test_a_plugin_that_fails_half_way_keeps_none_of_its_registrations(site, capsys):
    make_plugin(site, "t2l-fake-plugin", "t2l_fake_plugin", GOOD_PLUGIN, entry_name="fake")
    make_plugin(site, "t2l-half-plugin", "t2l_half_plugin", HALF_BROKEN_PLUGIN, entry_name="half")
    try:
        reg = manager.registry(reload=True)
    finally:
        sys.modules.pop("t2l_half_plugin", None)
    assert "fails after three registrations" in capsys.readouterr().err
    assert "half_encoder" not in reg.names("encoders") and "half_head" not in reg.names("heads")
    assert "half_family" not in reg.names("base_models")
    half = next(p for p in reg.plugins if p.name == "half")
    assert half.registered == {} and "RuntimeError" in half.error
    assert "fake_encoder" in reg.names("encoders") and "per_layer" in reg.names("heads")  # the others stay


MARKING_MODULE = """
import pathlib
pathlib.Path(__file__).with_name("imported.flag").write_text("ran")
from t2l_framework.hypernet import PerLayerHead as Head
"""


def test_plugin_lookups_import_code_only_when_asked(site):
    from t2l_framework.assembly import head_lookup

    (site / "t2l_marking_head.py").write_text(MARKING_MODULE)
    try:
        with pytest.raises(T2LError, match="hypernet.head: 't2l_marking_head:Head' is an import path"):
            head_lookup()("t2l_marking_head:Head")
        assert manager.registry().get("heads", "t2l_marking_head:Head") is None  # found, not run
        assert not (site / "imported.flag").exists() and "t2l_marking_head" not in sys.modules
        assert head_lookup()("per_layer").__name__ == "PerLayerHead"  # registered names need no trust
        assert head_lookup(import_code=True)("t2l_marking_head:Head").__name__ == "PerLayerHead"
        assert (site / "imported.flag").read_text() == "ran"
    finally:
        sys.modules.pop("t2l_marking_head", None)
