import dataclasses

import pytest

from cli import UserError, config_help, parse_config


@dataclasses.dataclass
class DemoConfig:
    n_layer: int = 4  # number of transformer blocks
    learning_rate: float = 1e-3  # peak learning rate
    compile: bool = False  # torch.compile the model
    out_dir: str = "out"  # where outputs go


def test_flags_are_typed():
    c = parse_config(DemoConfig, ["--n_layer=6", "--learning_rate=6e-4", "--compile=True", "--out_dir=run1"])
    assert c == DemoConfig(n_layer=6, learning_rate=6e-4, compile=True, out_dir="run1")
    assert parse_config(DemoConfig, []) == DemoConfig()


def test_flags_with_a_space_before_the_value():
    c = parse_config(DemoConfig, ["--out_dir", "Once upon a time", "--n_layer", "3", "--compile=True"])
    assert c == DemoConfig(out_dir="Once upon a time", n_layer=3, compile=True)


def test_config_file_then_flags(tmp_path):
    py = tmp_path / "small.py"
    py.write_text('"""a recipe"""\nn_layer = 2\nlearning_rate = 3e-4\ncompile = True\n')
    js = tmp_path / "more.json"
    js.write_text('{"out_dir": "out-json", "learning_rate": 1}')
    c = parse_config(DemoConfig, [str(py), str(js), "--n_layer=3"])
    assert c == DemoConfig(n_layer=3, learning_rate=1.0, compile=True, out_dir="out-json")


def test_a_config_file_after_a_flag_wins_and_says_so(tmp_path, capsys):
    py = tmp_path / "small.py"
    py.write_text("n_layer = 2\nout_dir = 'out-small'\n")
    c = parse_config(DemoConfig, ["--out_dir=mine", "--n_layer=2", str(py), "--compile=True"])
    assert c == DemoConfig(n_layer=2, out_dir="out-small", compile=True)  # nanoGPT's order: the later one wins
    assert capsys.readouterr().err == (f"note: {py} sets out_dir='out-small' over the earlier --out_dir='mine'; put "
                                       "flags after config files to override them\n")  # n_layer: the same, no note
    parse_config(DemoConfig, ["--out_dir=mine", str(py), "--out_dir=mine"])  # the flag after it wins: no note
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv, message", [
    (["--n_layr=3"], "unknown setting 'n_layr' in the command line (did you mean --n_layer?)"),
    (["--n_layer=three"], "--n_layer must be int, got 'three'"),
    (["--compile=maybe"], "--compile must be True or False, got 'maybe'"),
    (["--out_dir=x", "--n_layer"], "--n_layer needs a value: --key=value or --key value"),
    (["--out_dir", "--n_layer=3"], "--out_dir needs a value: --key=value or --key value"),  # not out_dir='--n_layer=3'
])
def test_bad_flags(argv, message):
    with pytest.raises(UserError) as e:
        parse_config(DemoConfig, argv)
    assert str(e.value) == message


@pytest.mark.parametrize("word, value", [("true", True), ("Yes", True), ("ON", True), ("1", True), ("False", False),
                                         ("no", False), ("Off", False), ("0", False)])
def test_every_true_and_false_word(word, value):
    assert parse_config(DemoConfig, [f"--compile={word}"]).compile is value
    assert parse_config(DemoConfig, ["--compile", word, "--n_layer=3"]) == DemoConfig(compile=value, n_layer=3)


def test_a_config_file_bool_is_not_a_number(tmp_path):
    for text in ("n_layer = True\n", '{"n_layer": true}'):  # (Python would take True as 1)
        path = tmp_path / ("c.json" if text.startswith("{") else "c.py")
        path.write_text(text)
        with pytest.raises(UserError, match="--n_layer must be int, got True"):
            parse_config(DemoConfig, [str(path)])


def test_bad_config_files(tmp_path):
    code = tmp_path / "code.py"
    code.write_text("import os\n")
    with pytest.raises(UserError, match="only `key = value` lines"):
        parse_config(DemoConfig, [str(code)])
    typo = tmp_path / "typo.py"
    typo.write_text("n_head = 4\n")
    with pytest.raises(UserError, match=r"unknown setting 'n_head' in .*typo.py"):
        parse_config(DemoConfig, [str(typo)])
    with pytest.raises(UserError, match="cannot read config file"):
        parse_config(DemoConfig, [str(tmp_path / "missing.py")])


def test_config_file_scalars_become_strings_for_str_fields_and_other_values_do_not(tmp_path):
    scalar = tmp_path / "scalar.py"
    scalar.write_text("out_dir = False\n")  # as train.py's compile = False in a recipe
    assert parse_config(DemoConfig, [str(scalar)]).out_dir == "False"
    for value in ("None", '["a", "b"]'):
        wrong = tmp_path / "wrong.py"
        wrong.write_text(f"out_dir = {value}\n")
        with pytest.raises(UserError, match="--out_dir must be str, got"):
            parse_config(DemoConfig, [str(wrong)])


def test_help_documents_every_field():
    text = config_help(DemoConfig, "Demo.")
    for name, comment in [("n_layer", "number of transformer blocks"), ("compile", "torch.compile the model")]:
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{name}="))
        assert comment in line
    for field in dataclasses.fields(DemoConfig):
        line = next(line for line in text.splitlines() if line.strip().startswith(f"--{field.name}="))
        assert len(line.split(None, 1)[1]) > 5, line  # a description follows the default


def test_a_config_file_with_a_byte_order_mark(tmp_path):
    """As Notepad saves UTF-8."""
    for name, text in (("bom.py", "n_layer = 2\n"), ("bom.json", '{"n_layer": 2}')):
        (tmp_path / name).write_text(text, encoding="utf-8-sig")
        assert parse_config(DemoConfig, [str(tmp_path / name)]).n_layer == 2


@pytest.mark.parametrize("name, text", [("nan.json", '{"learning_rate": NaN}'), ("inf.py", "learning_rate = 1e999\n"),
                                        ("inf.json", '{"learning_rate": -Infinity}'),
                                        ("huge.py", f"learning_rate = 1{'0' * 400}\n"),  # an int: float() overflows
                                        ("huge.json", f'{{"learning_rate": -1{"0" * 400}}}')])
def test_config_files_take_finite_numbers_only(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match="--learning_rate must be a finite number"):
        parse_config(DemoConfig, [str(tmp_path / name)])


def test_folders_under_the_home_folder(tmp_path, monkeypatch):
    """The shell expands ~ only at the start of a word: after --out_dir= it would make a folder named ~."""
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_config(DemoConfig, ["--out_dir=~/runs/a"]).out_dir == str(tmp_path / "runs" / "a")
    py = tmp_path / "c.py"
    py.write_text('out_dir = "~/b"\n')
    assert parse_config(DemoConfig, [str(py)]).out_dir == str(tmp_path / "b")


def test_a_folder_lock_is_skipped_where_the_filesystem_has_none(tmp_path, monkeypatch):
    fcntl = pytest.importorskip("fcntl")
    import errno

    from cli import lock_folder

    def no_locks(fd, operation):  # some NFS, Lustre and FUSE mounts
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert lock_folder(str(tmp_path), "busy") is None  # the run goes on unlocked, as on Windows
