"""The `t2l` command, run as a user runs it: in a subprocess."""

import os
import subprocess
import sys

import pytest

from tests.plugin_factory import BROKEN_PLUGIN, GOOD_PLUGIN, make_plugin


def t2l(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "t2l_framework.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=cwd, timeout=120)


def test_validate_prints_resolved_recipe():
    r = t2l("validate", "recipes/mistral_L.yaml")
    assert r.returncode == 0, r.stderr
    assert "head: per_layer" in r.stdout and "lr: 2.5e-05" in r.stdout
    assert "max_steps: 1180000" in r.stdout


def test_validate_with_override_and_typo(tmp_path):
    r = t2l("validate", "mistral_L", "hypernet.head=chunked")
    assert r.returncode == 0 and "head: chunked" in r.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("hypernet:\n  haed: per_layer\n")
    r = t2l("validate", str(bad))
    assert r.returncode == 2
    assert "unknown key 'hypernet.haed' (did you mean 'head'?)" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_recipes_lists_and_copies(tmp_path):
    r = t2l("recipes")
    assert r.returncode == 0
    lines = {line.split()[0]: line for line in r.stdout.splitlines()}
    assert "mistral_L" in lines and "Mistral-7B" in lines["mistral_L"]
    r = t2l("recipes", "cp", "mistral_S", str(tmp_path / "mine.yaml"))
    assert r.returncode == 0, r.stderr
    assert "head: chunked" in (tmp_path / "mine.yaml").read_text()
    r = t2l("recipes", "cp", "mistral_S", str(tmp_path / "mine.yaml"))
    assert r.returncode == 2 and "--force" in r.stderr
    r = t2l("recipes", "cp", "mistrall_S", str(tmp_path / "x.yaml"))
    assert r.returncode == 2 and "did you mean 'mistral_S'" in r.stderr


def test_plugins_lists_builtins_and_entry_points(tmp_path):
    site = make_plugin(tmp_path / "site", "t2l-fake-plugin", "t2l_fake_plugin", GOOD_PLUGIN, entry_name="fake")
    make_plugin(site, "t2l-broken-plugin", "t2l_broken_plugin", BROKEN_PLUGIN, entry_name="broken")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    r = t2l("plugins", env=env)
    assert r.returncode == 0, r.stderr
    assert "builtin" in r.stdout and "heads: per_layer, shared, chunked" in r.stdout
    assert "fake 1.0  (entry point t2l_fake_plugin)" in r.stdout and "encoders: fake_encoder" in r.stdout
    assert "FAILED TO LOAD: ImportError: this plugin is broken on purpose" in r.stdout
    r = t2l("plugins", env={**env, "T2L_PLUGINS": "fake"})
    assert "broken" not in r.stdout and "fake" in r.stdout


@pytest.mark.parametrize("command", ["validate", "recipes", "plugins"])
def test_every_command_has_help_with_an_example(command):
    r = t2l(command, "--help")
    assert r.returncode == 0 and "example:" in r.stdout


def test_bad_input_is_one_line_and_debug_shows_its_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hypernet:\n  haed: per_layer\n")
    for args in (("--debug", "validate", str(bad)), ("validate", str(bad), "--debug")):
        r = t2l(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" in r.stderr and "T2LError" in r.stderr
        assert r.stderr.rstrip().splitlines()[-1].startswith("error: ") and "unknown key 'hypernet.haed'" in r.stderr
        assert "bug" not in r.stderr


def test_an_exception_that_is_not_bad_input_is_a_bug_with_its_traceback(monkeypatch, capsys):
    from t2l_framework import cli, config

    def broken():
        raise ZeroDivisionError("an internal invariant broke")

    monkeypatch.setattr(config, "recipes_dir", broken)
    assert cli.main(["recipes"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: an internal invariant broke" in err
    assert err.rstrip().splitlines()[-1] == cli.BUG_HINT and "please report it" in cli.BUG_HINT
    assert cli.main(["--debug", "recipes"]) == 1 and cli.BUG_HINT in capsys.readouterr().err  # the same with --debug
    monkeypatch.undo()
    assert cli.main(["recipes", "cp", "nope"]) == 2 and "Traceback" not in capsys.readouterr().err
