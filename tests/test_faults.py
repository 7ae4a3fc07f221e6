"""
Bad input and faults, as a demanding user meets them (issue 12): each ends with one line that says what to do and exit
code 2 (130 for Ctrl-C), never a traceback; never loses or corrupts a file the user had; never lets a later run trust
stale or mismatched data. Every test checks the message, the exit code and the user's files byte for byte.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
import tiktoken

import cli
import prepare
from cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = tiktoken.get_encoding("gpt2")
PY_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def snapshot(folder):
    """Every file under folder, by relative path, with its bytes: what 'untouched' means here."""
    files = {}
    for path, _, names in os.walk(folder):
        for name in names:
            full = os.path.join(path, name)
            with open(full, "rb") as f:
                files[os.path.relpath(full, folder)] = f.read()
    return files


def one_line_error(capsys, main, *argv):
    """Run a script's main as its command line does: one line on stderr, exit code 2."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    # (datasets' progress bars may come before it, on lines of their own)
    assert "Traceback" not in err and err.endswith("\n") and err.count(": error: ") == 1, err
    line = err.splitlines()[-1]
    assert ": error: " in line, err
    return line


def script(name, *args, **kwargs):
    """A script run as the user runs it."""
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], cwd=kwargs.pop("cwd", ROOT),
                          capture_output=True, text=True, timeout=120, env=kwargs.pop("env", PY_ENV), **kwargs)


def assert_one_line(result, code, starts):
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(starts), result.stderr


# -----------------------------------------------------------------------------
# the command line and config files (cli.py)


def test_a_positional_argument_that_is_no_config_file_says_what_positionals_are(tmp_path):
    result = script("sample.py", "Once upon a time", cwd=tmp_path)
    assert_one_line(result, 2, "sample.py: error: cannot read config file Once upon a time (no such file): "
                               "positional arguments are config files")
    assert "--prompt='Once upon a time'" in result.stderr and result.stdout == ""
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("given", ["out/ckpt.pt", "out"])
def test_a_checkpoint_or_run_folder_given_as_a_config_file_points_at_out_dir(tmp_path, given):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "ckpt.pt").write_bytes(b"PK\x03\x04\x00\xff binary checkpoint")
    before = snapshot(tmp_path)
    result = script("sample.py", given, cwd=tmp_path)
    assert_one_line(result, 2, f"sample.py: error: {given} is not a config file")
    assert result.stderr.rstrip().endswith("give --out_dir=out")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", [b"\xff\xfe\x00binary\x89PNG", b"n_layer = 2\x00\x00\n", b"\x80abc = 1\n"])
def test_binary_or_non_utf8_config_files_are_one_line_errors(tmp_path, content):
    config = tmp_path / "config.py"
    config.write_bytes(content)
    result = script("train.py", str(config), f"--out_dir={tmp_path / 'out'}")
    assert_one_line(result, 2, f"train.py: error: config file {config} is not ")
    assert "config files" in result.stderr
    assert os.listdir(tmp_path) == ["config.py"] and config.read_bytes() == content


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numbers_are_rejected(value):
    from train import TrainConfig

    with pytest.raises(UserError, match=f"--learning_rate must be a finite number, got '{value}'"):
        cli.parse_config(TrainConfig, [f"--learning_rate={value}"])


# -----------------------------------------------------------------------------
# prepare.py


def prepare_run(tmp_path, *flags, out="out"):
    return prepare.main([f"--data_dir={tmp_path / out}", f"--cache_dir={tmp_path / 'hf-cache'}", *flags])


def train_bin(data_dir):
    return (data_dir / "train.bin").read_bytes()


def test_chunk_size_never_changes_what_a_story_is(tmp_path):
    # Official .txt: the first <|endoftext|> line comes after more than one small chunk of text. Blank-line .txt: a
    # line of spaces right after a blank line, where a chunk may end between the two.
    long_first = "A first story that is long. " * 40
    official = [long_first] + [f"Story {i}.\nIts second line." for i in range(60)]
    (tmp_path / "official.txt").write_text("".join(s + "\n<|endoftext|>\n" for s in official), encoding="utf-8")
    blank = [f"Tale {i}:\n  an indented line." for i in range(60)]
    (tmp_path / "blank.txt").write_text("\n\n   \n".join(blank) + "\n", encoding="utf-8")
    (tmp_path / "val.txt").write_text("Val.\n<|endoftext|>\n", encoding="utf-8")
    outputs = []
    for chunk_mb in ("4", "0.0001", "0.00013", "0.0007"):
        prepare_run(tmp_path, f"--train_files={tmp_path / 'official.txt'},{tmp_path / 'blank.txt'}",
                    f"--val_files={tmp_path / 'val.txt'}", f"--chunk_mb={chunk_mb}", out=f"out-{chunk_mb}")
        outputs.append(train_bin(tmp_path / f"out-{chunk_mb}"))
    expected = [t for s in official + blank for t in ENC.encode_ordinary(s) + [ENC.eot_token]]
    assert np.frombuffer(outputs[0], np.uint16).tolist() == expected  # <|endoftext|> never tokenized as text
    assert outputs[1:] == outputs[:1] * 3


@pytest.mark.parametrize("flag, message", [
    ("--chunk_mb=0", "--chunk_mb must be at least 0.0001 (100 bytes), got 0;"),
    ("--chunk_mb=-4", "--chunk_mb must be at least 0.0001 (100 bytes), got -4;"),
    ("--chunk_mb=1e-9", "--chunk_mb must be at least 0.0001 (100 bytes), got 1e-09;"),
    ("--num_workers=-1", "--num_workers must be 0 (all cores) or more, got -1"),
])
def test_bad_prepare_settings_leave_the_data_folder_alone(tmp_path, capsys, flag, message):
    (tmp_path / "train.txt").write_text("".join(f"Story {i}.\n<|endoftext|>\n" for i in range(20)))
    files = [f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0.5"]
    prepare_run(tmp_path, *files)
    before = snapshot(tmp_path / "out")
    err = one_line_error(capsys, prepare.main, f"--data_dir={tmp_path / 'out'}", *files, flag, "--force=True")
    assert message in err
    assert snapshot(tmp_path / "out") == before


@pytest.mark.parametrize("rows", [[{"text": 1}, {"text": 2}], [{"text": ["a", "b"]}], [{"text": {"a": "b"}}]])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_text_column_of_numbers_or_lists_is_a_one_line_error(tmp_path, capsys, rows, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_text(json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows))
    err = one_line_error(capsys, prepare.main, f"--train_files={path}", f"--data_dir={tmp_path / 'out'}",
                         f"--cache_dir={tmp_path / 'hf-cache'}")
    assert f"column 'text' of {path} holds " in err and "not text: name the column that holds the stories" in err
    assert not (tmp_path / "out" / "meta.json").exists()


def test_mixed_strings_and_numbers_in_a_text_column_is_a_one_line_error(tmp_path, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "a story"}\n{"text": 7}\n')
    err = one_line_error(capsys, prepare.main, f"--train_files={path}", f"--data_dir={tmp_path / 'out'}",
                         f"--cache_dir={tmp_path / 'hf-cache'}")
    assert "could not read the files" in err or "not text" in err


def test_raise_val_fraction_is_not_advised_when_val_files_were_given(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("One.\n<|endoftext|>\n")
    (tmp_path / "val.txt").write_text("\n\n")
    err = one_line_error(capsys, prepare.main, f"--train_files={tmp_path / 'train.txt'}",
                         f"--val_files={tmp_path / 'val.txt'}", f"--data_dir={tmp_path / 'out'}",
                         f"--cache_dir={tmp_path / 'hf-cache'}")
    assert "the val split is empty" in err and "give it files with --val_files" in err
    assert "raise --val_fraction" not in err


def replace_keeping_size_and_time(path, text):
    """What `cp -p`, rsync and tar do: other bytes, the same size and modification time."""
    st = os.stat(path)
    assert len(text.encode()) == st.st_size
    path.write_text(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_a_file_replaced_with_the_same_size_and_time_is_read_again(tmp_path, capsys):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("The cat sat.\n<|endoftext|>\nThe dog ran.\n<|endoftext|>\n")
    val.write_text("Val.\n")
    files = [f"--train_files={train}", f"--val_files={val}"]
    prepare_run(tmp_path, *files)
    replace_keeping_size_and_time(train, "The bat hid.\n<|endoftext|>\nThe fox sat.\n<|endoftext|>\n")
    capsys.readouterr()
    meta = prepare_run(tmp_path, *files)
    assert "up to date" not in capsys.readouterr().out
    expected = [t for s in ("The bat hid.", "The fox sat.") for t in ENC.encode_ordinary(s) + [ENC.eot_token]]
    assert np.frombuffer(train_bin(tmp_path / "out"), np.uint16).tolist() == expected
    assert meta["settings"]["train_files"][0]["sha256"] == prepare.file_sha256(train)


def test_force_reads_the_inputs_again_not_a_cached_copy(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("The cat sat.\n<|endoftext|>\n")
    val.write_text("Val.\n")
    files = [f"--train_files={train}", f"--val_files={val}"]
    prepare_run(tmp_path, *files)
    good = train_bin(tmp_path / "out")
    # damage datasets' cached copy of train.txt: an Arrow stream of other text
    cached = [os.path.join(p, n) for p, _, names in os.walk(tmp_path / "hf-cache") for n in names
              if n.endswith(".arrow") and prepare.file_sha256(train) in p]
    assert cached
    for path in cached:
        table = pa.table({"text": ["Stale text.\n", "<|endoftext|>\n"]})
        with pa.OSFile(path, "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
            writer.write_table(table)
    prepare_run(tmp_path, *files, "--seed=2")  # a rebuild without --force trusts datasets' cache...
    assert train_bin(tmp_path / "out") != good
    prepare_run(tmp_path, *files, "--seed=2", "--force=True")  # ...--force reads the file itself
    assert train_bin(tmp_path / "out") == good


def test_meta_records_the_tokenizers_content_hash(tmp_path):
    (tmp_path / "train.txt").write_text("".join(f"Story {i} about a cat.\n<|endoftext|>\n" for i in range(50)))
    bpe = prepare_run(tmp_path, f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0.2", "--tokenizer=bpe:300")
    assert bpe["tokenizer_sha256"] == prepare.file_sha256(tmp_path / "out" / "tokenizer.json")
    gpt2 = prepare_run(tmp_path, f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0.2", out="gpt2")
    assert gpt2["tokenizer_sha256"] == prepare.Tokenizer("gpt2").sha256 != bpe["tokenizer_sha256"]
    # a tokenizer.json swapped in the data folder is not trusted: the next prepare.py run rebuilds
    (tmp_path / "out" / "tokenizer.json").write_text((tmp_path / "out" / "tokenizer.json").read_text() + " ")
    assert prepare.read_meta_if_complete(str(tmp_path / "out"), bpe["settings"]) is None
