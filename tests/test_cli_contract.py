"""The command-line contract of ``python -m lrjax.convert`` and ``python -m lrjax.export``: inputs
checked before any work, one ``error:`` line and exit 2 for a bad input (never a traceback),
``--overwrite`` replacing only an output of the same kind lrjax wrote, atomically, and nothing
else written or lost."""

import os

import numpy as np
import pytest

from lrjax import checkpoint, models
from lrjax.cli import convert as convert_cli
from lrjax.cli import export as export_cli


def _tree(root) -> dict:
    """Every file under ``root`` with its bytes: what a failed command must leave unchanged."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A folder with a cnn checkpoint, an ordinary folder holding a user's file, a foreign file
    named like an export, an lrjax .npz output and a corrupt .npz."""
    root = tmp_path_factory.mktemp("cli")
    checkpoint.save_variables(str(root / "cnn.npz"),
                              models.init_variables(models.get_model("cnn"), 32))
    (root / "folder").mkdir()
    (root / "folder" / "keep.txt").write_text("mine")
    (root / "notes.onnx").write_text("not an onnx model")
    (root / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    checkpoint.save_variables(str(root / "old.npz"), {"params": {"a": np.ones(3)}})
    return root


CONVERT = ["--model", "cnn", "--ranks", "speedup:1.5"]

CASES = [  # (command, argv with {w} for the work folder, expected message)
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/folder", "--overwrite"],
     r"refusing to replace .*folder: it is a folder that is not a orbax output lrjax wrote"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/out.onnx"],
     r"has the suffix '.onnx': a variables checkpoint is a .npz file or an Orbax folder"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/missing/out.npz"],
     r"folder .*missing does not exist"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/old.npz"],
     r"old.npz exists; pass --overwrite to replace it"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/notes.onnx", "--overwrite"],
     r"suffix '.onnx'"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/o.npz", "--json",
                 "{w}/folder", "--overwrite"], r"a json output needs '.json'"),
    ("convert", ["--checkpoint", "{w}/nothing.npz", "--output", "{w}/o.npz"],
     r"checkpoint '.*nothing.npz' does not exist"),
    ("convert", ["--checkpoint", "{w}/broken.npz", "--output", "{w}/o.npz"],
     r"broken.npz' is not a readable .npz checkpoint \((?!.*allow_pickle)"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/o.npz", "--multiple", "0"],
     r"multiple must be a positive int; got 0"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/o.npz", "--ranks",
                 "speedupp:2"], r"unknown rule kind 'speedupp:'"),
    ("convert", ["--checkpoint", "{w}/cnn.npz", "--output", "{w}/o.npz", "--model", "resnet"],
     r"unknown model 'resnet'"),
    ("export", ["--format", "onnx", "--output", "{w}/folder", "--overwrite"],
     r"suffix 'none'; a onnx output needs '.onnx'"),
    ("export", ["--format", "onnx", "--output", "{w}/notes.onnx", "--overwrite"],
     r"refusing to replace .*notes.onnx: it is a file that is not a onnx output lrjax wrote"),
    ("export", ["--format", "tflite", "--output", "{w}/m.onnx"],
     r"a tflite output needs '.tflite'"),
    ("export", ["--format", "onnx", "--output", "{w}/m.onnx", "--checkpoint", "{w}/none.npz"],
     r"checkpoint '.*none.npz' does not exist"),
]


@pytest.mark.parametrize("command,argv,match", CASES,
                         ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_bad_input_is_one_error_line_and_nothing_is_written_or_lost(work, capsys, command,
                                                                    argv, match):
    before = _tree(work)
    argv = [a.format(w=work) for a in argv]
    if command == "convert":
        argv = CONVERT + argv if "--model" not in argv else CONVERT[2:] + argv
        code = convert_cli.main(argv)
    else:
        code = export_cli.main(["--model", "cnn", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert __import__("re").search(match, err[0]), err[0]
    assert _tree(work) == before  # nothing written, nothing lost


@pytest.mark.parametrize("fmt", ["npz", "orbax"])
def test_overwrite_replaces_an_lrjax_checkpoint_atomically(work, tmp_path, fmt):
    out = str(tmp_path / ("low.npz" if fmt == "npz" else "low"))
    checkpoint.save_variables(out, {"params": {"stale": np.zeros(2)}})
    argv = CONVERT + ["--checkpoint", str(work / "cnn.npz"), "--output", out, "--overwrite",
                      "--json", str(tmp_path / "r.json")]
    assert convert_cli.main(argv) == 0
    params = checkpoint.load_variables(out)["params"]
    assert "stale" not in params and any("vertical" in v for v in params.values())
    leftovers = [n for n in os.listdir(tmp_path) if n.startswith(".")]
    assert leftovers == []  # no temporary or set-aside folder remains
    assert convert_cli.main(argv) == 0  # the report JSON is replaced too


def test_overwrite_replaces_an_export_of_the_same_format(work, tmp_path):
    out = str(tmp_path / "m.onnx")
    argv = ["--model", "cnn", "--format", "onnx", "--output", out]
    assert export_cli.main(argv) == 0
    first = os.path.getmtime(out)
    assert export_cli.main(argv + ["--overwrite"]) == 0
    assert checkpoint.is_lrjax_output(out, "onnx") and os.path.getmtime(out) >= first


@pytest.mark.parametrize("main", [convert_cli.main, export_cli.main])
def test_help_exits_0_and_documents_every_flag(main, capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    parser = (convert_cli if main is convert_cli.main else export_cli).build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help text"
            assert action.option_strings[0] in text
