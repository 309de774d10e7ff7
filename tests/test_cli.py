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
    assert r.returncode == 1
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
    assert r.returncode == 1 and "--force" in r.stderr
    r = t2l("recipes", "cp", "mistral_S", str(tmp_path / "mine.yaml"), "--force")
    assert r.returncode == 0, r.stderr
    r = t2l("recipes", "cp", "mistrall_S", str(tmp_path / "x.yaml"))
    assert r.returncode == 1 and "did you mean 'mistral_S'" in r.stderr
    r = t2l("recipes", "cp", "mistral_S")  # DEST missing: a usage error, argparse's
    assert r.returncode == 2 and "dest" in r.stderr


def test_a_closed_output_pipe_ends_quietly():
    """`t2l recipes | head -1`: the reader is gone before we write; no traceback, no bug hint."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        r = subprocess.run([sys.executable, "-m", "t2l_framework.cli", "recipes"], stdout=write_end,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "bug" not in r.stderr and "Exception ignored" not in r.stderr


def test_recipes_ls_is_what_bare_recipes_lists(capsys):
    from t2l_framework import cli

    assert cli.main(["recipes"]) == 0
    bare = capsys.readouterr().out
    assert cli.main(["recipes", "ls"]) == 0
    assert capsys.readouterr().out == bare and "mistral_L" in bare


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


def _commands(parser=None, prefix=()):
    """Every command and sub-command of ``t2l``, as argument tuples (``("data", "fetch")``)."""
    import argparse

    from t2l_framework.cli import build_parser

    parser = parser or build_parser()
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += [prefix + (name,)] + _commands(sub, prefix + (name,))
    return found


COMMANDS = _commands()


def test_the_command_list_is_complete():
    names = {c[0] for c in COMMANDS}
    assert {"validate", "recipes", "plugins", "fit", "eval", "generate", "serve", "data", "import-reference",
            "push", "inspect"} <= names
    assert ("recipes", "ls") in COMMANDS and ("recipes", "cp") in COMMANDS and ("data", "fetch") in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help_with_an_example(command, capsys):
    from t2l_framework import cli

    with pytest.raises(SystemExit) as stop:
        cli.main([*command, "--help"])
    out = capsys.readouterr().out
    assert stop.value.code == 0
    assert f"usage: t2l {' '.join(command)}" in out
    assert "example:\n  t2l " in out or "example:\n  T2L_PLUGINS=e5 t2l " in out


def test_help_documents_the_exit_codes_and_version_is_the_package_s():
    from importlib.metadata import version

    r = t2l("--help")
    assert r.returncode == 0 and "exit status:" in r.stdout
    for code in ("0", "1", "2", "3", "130", "143"):
        assert f"\n  {code} " in r.stdout, code
    r = t2l("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"t2l {version('t2l-framework')}"


def test_usage_errors_exit_2_and_bad_option_values_are_usage_errors(capsys):
    from t2l_framework import cli

    for argv in (["nosuchcommand"], ["eval", "runs/x", "--n-descriptions", "0"], ["eval", "runs/x", "--limit", "-1"],
                 ["eval", "runs/x", "--batch-size", "0"], ["serve", "runs/x", "--max-batch", "0"],
                 ["eval", "runs/x", "--max-new-tokens", "x"]):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2, argv
    assert "expected an integer >= 1, got 0" in capsys.readouterr().err


def test_eval_options_left_out_are_none_and_0_means_one_thing_only():
    """Left out = the recipe's value (evaluate() reads None so); 0 is "all" for --limit and refused
    where it would mean something else (usage error, exit 2)."""
    import pytest as _pytest

    from t2l_framework.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "runs/x"])
    assert (args.limit, args.n_descriptions, args.batch_size, args.max_new_tokens) == (None, None, None, None)
    assert parser.parse_args(["eval", "runs/x", "--limit", "0"]).limit == 0
    for option in ("--n-descriptions", "--batch-size", "--max-new-tokens"):
        with _pytest.raises(SystemExit) as exc:
            parser.parse_args(["eval", "runs/x", option, "0"])
        assert exc.value.code == 2, option


def test_cut_short_and_signals_keep_their_exit_codes(monkeypatch, capsys):
    from t2l_framework import cli
    from t2l_framework.training import budget
    from t2l_framework.training.run import TrainingInterrupted

    def interrupted(*a, **k):
        raise TrainingInterrupted("stopped by SIGTERM; resume with --resume", 143)

    monkeypatch.setattr("t2l_framework.assembly.fit", interrupted)
    assert cli.main(["fit", "smollm2_demo"]) == 143
    monkeypatch.setattr("t2l_framework.assembly.fit", lambda *a, **k: "runs/x")
    monkeypatch.setattr(budget, "exit_status", lambda run_dir: budget.EXIT_CUT_SHORT)
    assert cli.main(["fit", "smollm2_demo"]) == 3 and "cut short" in capsys.readouterr().err

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("t2l_framework.assembly.fit", ctrl_c)
    assert cli.main(["fit", "smollm2_demo"]) == 130


def test_bad_input_is_one_line_and_debug_shows_its_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hypernet:\n  haed: per_layer\n")
    for args in (("--debug", "validate", str(bad)), ("validate", str(bad), "--debug")):
        r = t2l(*args)
        assert r.returncode == 1, r.stderr
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
    assert cli.main(["recipes", "cp", "nope", "x.yaml"]) == 1 and "Traceback" not in capsys.readouterr().err
