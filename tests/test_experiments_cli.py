"""The experiments' command lines keep lrjax's contract: ``--help`` exits 0, and a flag that does
not parse is one ``error:`` line and exit 2, never a traceback (checked in-process on the same
absl flags the modules define)."""

import os
import subprocess
import sys

import ml_collections
import pytest

import experiments.cifar_nin  # noqa: F401  (defines --config and --workdir)
from experiments import entry

CONFIG = os.path.join(os.path.dirname(entry.__file__), "configs", "cifar_nin.py")


def _exit(argv, capsys):
    with pytest.raises(SystemExit) as done:
        entry.check_flags(["cifar_nin", *argv])
    captured = capsys.readouterr()
    return done.value.code, captured.out, captured.err.strip().splitlines()


@pytest.mark.parametrize("argv,match", [
    (["--workdir", "w", f"--config={CONFIG}:bogus"],
     "unknown config variant 'bogus'; use '' or 'local'"),
    ([], "Flag --workdir must have a value other than None"),
    (["--workdir", "w", "--colour=red"], "Unknown command line flag 'colour'"),
])
def test_bad_flags_are_one_error_line(argv, match, capsys):
    code, _, err = _exit(argv, capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_help_exits_0_and_lists_the_flags(capsys):
    code, out, _ = _exit(["--help"], capsys)
    assert code == 0 and "--workdir" in out and "--config" in out


def test_a_misspelt_config_field_is_one_error_line(monkeypatch, capsys):
    """``--config.FIELD`` overrides are read as the flag is defined (at import)."""
    monkeypatch.setattr(sys, "argv", ["cifar_nin", "--probe_config.num_epoch=5"])
    with pytest.raises(SystemExit) as done:
        entry.define_config_file("probe_config", CONFIG, "a probe")
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --probe_config has no field 'num_epoch'") \
        and 'Did you mean "num_epochs"' in err[0]


def test_the_real_command_line(tmp_path):
    """One run of the module as a user runs it: a value of the wrong type for a config field."""
    done = subprocess.run([sys.executable, "-m", "experiments.cifar_nin", "--workdir",
                           str(tmp_path / "w"), "--config.num_epochs=abc"],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(entry.__file__)))
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert errors == ["error: flag --config.num_epochs=abc: invalid literal for int() with "
                      "base 10: 'abc'"]
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module,variants", [("cifar_nin", ("", "local")),
                                             ("imagenet_vgg", ("", "scratch", "tiny"))])
def test_every_config_field_can_be_overridden_on_the_command_line(module, variants):
    """A field a variant leaves ``None`` keeps a type (a typed ``FieldReference``): otherwise
    ``--config.FIELD=...`` fails with ml_collections' "NoneType ... not supported"."""
    import importlib

    configs = importlib.import_module(f"experiments.configs.{module}")
    for variant in variants:
        config = configs.get_config(variant)
        untyped = [name for name, value in config.items()
                   if value is None and not isinstance(config._fields[name],
                                                       ml_collections.FieldReference)]
        assert untyped == [], (variant, untyped)
