"""pspnet_keras/cli.py: the parser every command uses, its argument types, the run wrapper with its
exit codes, and the checks of the paths a command writes to."""

import argparse
import os
from types import SimpleNamespace

import pytest

from pspnet_keras import cli


def spelling_parser():
    """A cli.ArgumentParser with options declared in each spelling, in groups as the commands declare them."""
    parser = cli.ArgumentParser(prog="prog")
    parser.add_argument("--input_path")
    parser.add_argument("--save-probs", action="store_true")
    group = parser.add_argument_group("group")
    group.add_argument("--grouped_flag", type=int)
    exclusive = parser.add_mutually_exclusive_group()
    exclusive.add_argument("--no-flip", action="store_true")
    exclusive.add_argument("--multi_scale", action="store_true")
    parser.add_argument("rest", nargs="*")
    return parser


def test_canonical_flag_spellings():
    """Every long option is read with '-' or '_' between its words, as declared; after '--' nothing is respelt."""
    parser = spelling_parser()
    args = parser.parse_args(["--input-path=a_b-c", "--save_probs", "--grouped-flag", "3", "--no_flip", "--", "--input-path"])
    assert args.input_path == "a_b-c"
    assert args.save_probs is True
    assert args.grouped_flag == 3
    assert args.no_flip is True and args.multi_scale is False
    assert args.rest == ["--input-path"]
    assert parser.parse_args(["--multi-scale"]).multi_scale is True
    assert parser.parse_args(["--input_path", "x", "--save-probs"]).input_path == "x"


def test_declared_spelling():
    parser = spelling_parser()
    assert parser.declared_spelling("--input-path=a_b-c") == "--input_path=a_b-c"
    assert parser.declared_spelling("--save_probs") == "--save-probs"
    assert parser.declared_spelling("--unknown_flag") == "--unknown_flag"
    assert parser.declared_spelling("-i") == "-i"
    assert parser.declared_spelling("value_with_underscores") == "value_with_underscores"


def test_unknown_flag_is_refused_as_typed(capsys):
    with pytest.raises(SystemExit) as raised:
        spelling_parser().parse_args(["--unknown_flag"])
    assert raised.value.code == cli.EXIT_USAGE
    assert "unrecognized arguments: --unknown_flag" in capsys.readouterr().err


def test_mutually_exclusive_options_in_either_spelling_still_conflict(capsys):
    with pytest.raises(SystemExit):
        spelling_parser().parse_args(["--no_flip", "--multi-scale"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_help_shows_the_declared_spelling(capsys):
    with pytest.raises(SystemExit) as raised:
        spelling_parser().parse_args(["--help"])
    assert raised.value.code == 0
    text = capsys.readouterr().out
    assert "--input_path" in text and "--input-path" not in text
    assert "--save-probs" in text and "--save_probs" not in text


@pytest.mark.parametrize("text, value", [("1", 1), ("7", 7), ("0012", 12)])
def test_positive_int_accepts(text, value):
    assert cli.positive_int(text) == value


@pytest.mark.parametrize(
    "text, message",
    [("0", "must be at least 1, got 0"), ("-3", "must be at least 1, got -3"),
     ("2.5", "not an integer: '2.5'"), ("two", "not an integer: 'two'"), ("", "not an integer: ''")],
)
def test_positive_int_refuses(text, message):
    with pytest.raises(argparse.ArgumentTypeError) as raised:
        cli.positive_int(text)
    assert str(raised.value) == message


def test_integer_minimum():
    assert cli.integer(0)("0") == 0
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be at least 0, got -1$"):
        cli.integer(0)("-1")


def test_positive_int_in_a_parser(capsys):
    parser = cli.ArgumentParser(prog="prog")
    parser.add_argument("--workers", type=cli.positive_int)
    assert parser.parse_args(["--workers", "2"]).workers == 2
    with pytest.raises(SystemExit) as raised:
        parser.parse_args(["--workers", "0"])
    assert raised.value.code == cli.EXIT_USAGE
    assert "prog: error: argument --workers: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options, text, value",
    [({"minimum": 0}, "0", 0.0), ({"minimum": 0}, "0.5", 0.5), ({"minimum": 0}, "1e3", 1000.0),
     ({"minimum": 0, "strictly": True}, "1e-9", 1e-9), ({"minimum": 0, "below": 1}, "0.999", 0.999)],
)
def test_number_accepts(options, text, value):
    assert cli.number(**options)(text) == value


@pytest.mark.parametrize(
    "options, text, message",
    [({"minimum": 0}, "-1", "must be at least 0, got -1"),
     ({"minimum": 0}, "-0.5", "must be at least 0, got -0.5"),
     ({"minimum": 0}, "nan", "must be at least 0, got nan"),
     ({"minimum": 0}, "inf", "must be at least 0, got inf"),
     ({"minimum": 0}, "half", "not a number: 'half'"),
     ({"minimum": 0, "strictly": True}, "0", "must be above 0, got 0"),
     ({"minimum": 0.5}, "0.25", "must be at least 0.5, got 0.25"),
     ({"minimum": 0, "below": 1}, "1", "must be below 1, got 1"),
     ({"minimum": 0, "below": 1}, "2.5", "must be below 1, got 2.5")],
)
def test_number_refuses(options, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as raised:
        cli.number(**options)(text)
    assert str(raised.value) == message


def test_gpus_per_worker_must_be_at_least_zero(capsys):
    parser = cli.ArgumentParser(prog="prog")
    cli.add_ray_arguments(parser)
    assert parser.parse_args(["--ray", "--gpus-per-worker", "0.5"]).gpus_per_worker == 0.5
    with pytest.raises(SystemExit):
        parser.parse_args(["--ray", "--gpus_per_worker", "-1"])
    assert "argument --gpus-per-worker: must be at least 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--workers", "2"], ["--gpus-per-worker", "1"], ["--cpus_per_worker", "1"]])
def test_ray_options_need_ray(option, capsys):
    parser = cli.ArgumentParser(prog="prog")
    cli.add_ray_arguments(parser)
    args = parser.parse_args(option)
    with pytest.raises(SystemExit) as raised:
        cli.check_ray_arguments(parser, args)
    assert raised.value.code == cli.EXIT_USAGE
    assert f"prog: error: {option[0].replace('_', '-')} needs --ray" in capsys.readouterr().err
    cli.check_ray_arguments(parser, parser.parse_args(["--ray", *option]))
    assert parser.parse_args(["--ray"]).ray == cli.RAY_LOCAL
    assert parser.parse_args(["--ray", "auto"]).ray == "auto"


def test_directory_problem_none_for_creatable_directories(tmp_path):
    assert cli.directory_problem(tmp_path) is None
    assert cli.directory_problem(tmp_path / "new" / "deeper") is None


def test_directory_problem_under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    assert cli.directory_problem(tmp_path / "file" / "out") == (
        f"cannot create the output directory ({tmp_path / 'file'} is not a directory)"
    )
    assert cli.directory_problem(tmp_path / "file", what="the save directory") == (
        f"cannot create the save directory ({tmp_path / 'file'} is not a directory)"
    )


def test_directory_problem_through_a_dangling_link(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "absent")
    assert cli.existing_ancestor(tmp_path / "link" / "out") == tmp_path / "link"
    assert cli.directory_problem(tmp_path / "link" / "out") == (
        f"cannot create the output directory ({tmp_path / 'link'} is not a directory)"
    )


def test_directory_problem_read_only(tmp_path, monkeypatch):
    """A directory this process may not write in (os.access says no: the tests run as root, whom
    permission bits do not stop)."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(locked))
    assert cli.directory_problem(locked / "new" / "out") == f"cannot write in {locked} (permission denied)"


def test_directory_problem_names_a_read_only_file_system(tmp_path, monkeypatch):
    """A folder on a file system mounted read-only (statvfs says ST_RDONLY; os.access says no)."""
    mounted = tmp_path / "mnt"
    mounted.mkdir()
    status = os.statvfs(mounted)
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(mounted))
    monkeypatch.setattr(os, "statvfs", lambda path: SimpleNamespace(f_flag=status.f_flag | os.ST_RDONLY))
    assert cli.directory_problem(mounted / "out") == f"cannot write in {mounted} (read-only file system)"


def test_replaced_file_by_path_symbolic_and_hard_link(tmp_path):
    image = tmp_path / "image.png"
    image.write_bytes(b"pixels")
    index = cli.Inputs({image: "an input image"})
    assert index.find(image) == (image, "an input image")
    assert index.find(tmp_path / "." / "image.png") == (image, "an input image")
    (tmp_path / "soft.png").symlink_to(image)
    assert index.find(tmp_path / "soft.png") == (image, "an input image")
    os.link(image, tmp_path / "hard.png")
    assert index.find(tmp_path / "hard.png") == (image, "an input image")
    assert index.find(tmp_path / "other.png") is None
    (tmp_path / "other.png").write_bytes(b"pixels")
    assert index.find(tmp_path / "other.png") is None


def test_replaced_file_first_description_wins(tmp_path):
    weights = tmp_path / "model.h5"
    weights.write_bytes(b"")
    (tmp_path / "alias.h5").symlink_to(weights)
    index = cli.Inputs({weights: "the weights file", tmp_path / "alias.h5": "something else"})
    assert index.find(weights) == (weights, "the weights file")
    assert index.find(tmp_path / "alias.h5") == (weights, "the weights file")
    assert cli.file_identity(tmp_path / "absent") is None


def test_inputs_hold_every_existing_file_of_an_added_folder(tmp_path):
    data = tmp_path / "data"
    (data / "other_split").mkdir(parents=True)
    (data / "other_split" / "a.png").write_bytes(b"pixels")
    inputs = cli.Inputs()
    inputs.add_folder(data, "a file of the dataset")
    assert inputs.find(data / "other_split" / "a.png") == (data / "other_split" / "a.png", "a file of the dataset")
    assert inputs.find(data / "new.json") is None
    assert inputs.find(tmp_path / "outside.json") is None
    assert inputs.inside(tmp_path) == (data, "a file of the dataset")


def test_output_problem_never_replaces_an_input_even_with_overwrite(tmp_path):
    weights = tmp_path / "model.h5"
    weights.write_bytes(b"weights")
    (tmp_path / "link.h5").symlink_to(weights)
    inputs = cli.Inputs({weights: "the weights file"})
    for target in (weights, tmp_path / "link.h5"):
        for overwrite in (False, True):
            assert cli.output_problem(target, inputs, overwrite) == (
                f"is the weights file {weights}, which this command reads; it is never replaced"
            )


def test_output_problem_replaces_an_existing_file_only_with_overwrite(tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text("{}")
    assert cli.output_problem(notes) == "exists; pass --overwrite to replace it, or choose another path"
    assert cli.output_problem(notes, overwrite=True) is None
    assert cli.output_problem(tmp_path / "new.json") is None
    os.mkfifo(tmp_path / "fifo")
    assert cli.output_problem(tmp_path / "fifo", overwrite=True) == (
        "exists and is not a regular file; refusing to replace it"
    )
    assert cli.output_problem(tmp_path, overwrite=True) == "is a directory"


def test_folder_output_problem_keeps_foreign_files_and_inputs(tmp_path):
    own = {"saved_model.pb", "variables"}
    folder = tmp_path / "sm"
    assert cli.folder_output_problem(folder, own) is None
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(b"graph")
    assert cli.folder_output_problem(folder, own) == "exists; pass --overwrite to replace it, or choose another path"
    assert cli.folder_output_problem(folder, own, overwrite=True) is None
    (folder / "README").write_text("my notes")
    assert cli.folder_output_problem(folder, own, overwrite=True) == (
        "holds files that it would lose (README); refusing to replace it"
    )
    (folder / "README").unlink()
    weights = folder / "variables" / "final.h5"
    weights.write_bytes(b"weights")
    assert cli.folder_output_problem(folder, own, cli.Inputs({weights: "the weights file"}), overwrite=True) == (
        f"holds the weights file {weights}, which this command reads; it is never replaced"
    )


def test_run_command_exit_codes(capsys):
    def fail(args):
        raise cli.CommandError(f"{args}: no such file")

    assert cli.run_command("prog", lambda args: cli.EXIT_OK, None) == cli.EXIT_OK
    assert cli.run_command("prog", fail, "x.png") == cli.EXIT_FAILURE
    assert capsys.readouterr().err == "prog: error: x.png: no such file\n"
    assert cli.run_command("prog", fail, "x.png", error_prefix="") == cli.EXIT_FAILURE
    assert capsys.readouterr().err == "prog: x.png: no such file\n"


@pytest.mark.parametrize(
    "error, code, line",
    [(KeyboardInterrupt, cli.EXIT_INTERRUPTED, "prog: interrupted; partial\n"),
     (cli.Terminated, cli.EXIT_TERMINATED, "prog: terminated; partial\n")],
)
def test_run_command_interruptions(error, code, line, capsys):
    import signal

    previous = signal.getsignal(signal.SIGTERM)

    def stopped(args):
        raise error()

    try:
        assert cli.run_command("prog", stopped, None, interrupted_suffix="; partial") == code
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert capsys.readouterr().err == line
    assert cli.interruption_exit_code(error()) == code
