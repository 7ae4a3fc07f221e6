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
    """Run a script's main as its command line does: one line on stderr, exit code 2. Returns the message."""
    with pytest.raises(SystemExit) as e:
        cli.run_main(main, list(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2, err
    # (datasets' progress bars may come before it, on lines of their own)
    assert "Traceback" not in err and err.endswith("\n") and err.count(": error: ") == 1, err
    line = err.splitlines()[-1]
    assert ": error: " in line, err
    return line.split(": error: ", 1)[1]  # (in-process, the script is called __main__.py or pytest)


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
    blank = [f"Tale {i}:\n  an indented line.\n  and one more." for i in range(60)]  # (3 lines: the chunk sizes
    # below then end a chunk between the blank line and the line of spaces)
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
    ("--val_fraction=1", "--val_fraction must be at least 0 and below 1, got 1.0"),  # at once, not after the work
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


# -----------------------------------------------------------------------------
# train.py: the run's files, the data it trains on, and its tokenizer

STORIES = ["Tom had a red ball. He liked to play with it in the park.",
           "Lily saw a big dog. The dog was kind and they ran together.",
           "Ben and Mia made a cake. It was sweet and they were happy."]
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
        "--gradient_accumulation_steps=1", "--eval_tokens=64", "--log_interval=1", "--warmup_iters=1",
        "--learning_rate=1e-2", "--min_lr=1e-3", "--device=cpu", "--dtype=float32", "--compile=False", "--plot=False",
        "--peak_flops=1e12"]


def make_bpe_data(data_dir, words):
    """A bpe:300 data folder as prepare.py writes it, its tokenizer trained on stories made of `words`: two calls with
    other words make two different tokenizers that share the name bpe:300."""
    os.makedirs(data_dir)
    texts = [f"{s} {words}" for s in STORIES] * 4
    prepare.train_bpe(300, iter([texts]), os.path.join(data_dir, "tokenizer.json"))
    tokenizer = prepare.Tokenizer("bpe:300", os.path.join(data_dir, "tokenizer.json"))
    meta = {"tokenizer": "bpe:300", "tokenizer_file": "tokenizer.json", "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token, "dtype": "uint16"}
    for split, repeat in (("train", 12), ("val", 3)):
        ids = tokenizer.encode_stories(texts * repeat).astype(np.uint16)
        ids.tofile(os.path.join(data_dir, f"{split}.bin"))
        meta[split] = {"file": f"{split}.bin", "tokens": len(ids), "stories": len(texts) * repeat,
                       "bytes": len("".join(texts * repeat).encode())}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def train_main(argv):
    import train

    return train.main(argv)


def run_train(data_dir, out_dir, *flags):
    cli.run_main(train_main, [f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY, *flags])


@pytest.fixture
def trained(tmp_path):
    """A data folder, and a run trained on it for 4 steps: (data_dir, out_dir)."""
    data, out = tmp_path / "data", tmp_path / "out"
    make_bpe_data(data, "apples and pears")
    run_train(data, out, "--max_iters=4", "--eval_interval=2")
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "tokenizer.json"]
    return data, out


def test_a_new_run_never_overwrites_a_trained_checkpoint(trained, capsys):
    data, out = trained
    before = snapshot(out)
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=2")
    assert err == (f"{out / 'ckpt.pt'} holds a trained checkpoint that a new run would replace: "
                   "continue it with --init_from=resume, choose another --out_dir, or start over with "
                   "--overwrite=True (replaces its ckpt.pt and log.jsonl)")
    assert snapshot(out) == before  # no log wiped, no tokenizer copied
    # --overwrite=True starts over, as asked
    run_train(data, out, "--max_iters=2", "--eval_interval=2", "--overwrite=True")
    import torch

    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2
    assert [json.loads(line)["iter"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 2]
    with pytest.raises(UserError, match="--overwrite=True starts a new run .* neither --init_from=resume"):
        train_main([f"--data_dir={data}", f"--out_dir={out}", *TINY, "--overwrite=True", "--init_from=resume"])


@pytest.mark.parametrize("mode", ["--init_from=resume", "--eval_only=True"])
@pytest.mark.parametrize("old_meta", [False, True], ids=["hash-in-meta", "meta-without-hash"])
def test_another_tokenizer_of_the_same_name_is_refused(trained, tmp_path, capsys, mode, old_meta):
    data, out = trained
    other = tmp_path / "other"
    meta = make_bpe_data(other, "rockets and stars")  # also bpe:300, with another vocabulary
    if old_meta:  # as prepare.py wrote it before it recorded the hash: the hash comes from the file
        del meta["tokenizer_sha256"]
        (other / "meta.json").write_text(json.dumps(meta))
    before = snapshot(out)
    err = one_line_error(capsys, train_main, f"--data_dir={other}", f"--out_dir={out}", *TINY, "--max_iters=6", mode)
    assert f"{out / 'ckpt.pt'} was trained with another bpe:300 tokenizer than the one that made {other}" in err
    assert err.endswith("the same ids mean other text. Use the --data_dir it was trained on")
    assert snapshot(out) == before  # the run's tokenizer.json above all


def test_eval_only_writes_nothing_at_all(trained, capsys):
    data, out = trained
    before = snapshot(out)
    run_train(data, out, "--eval_only=True", "--plot=True")
    assert "eval iter 4:" in capsys.readouterr().out
    assert snapshot(out) == before
    # a batch size that could not make up a training step's tokens is still fine for evaluating
    run_train(data, out, "--eval_only=True", "--batch_size=3", "--gradient_accumulation_steps=0")
    assert "eval iter 4:" in capsys.readouterr().out


@pytest.mark.parametrize("damage, message", [
    ("empty", "meta.json is damaged or unreadable (empty"),
    ("truncated", "meta.json is damaged or unreadable ("),
    ("binary", "meta.json is damaged or unreadable ("),
    ("a list", "meta.json is not a complete meta.json of prepare.py"),
    ("no dtype", "meta.json is not a complete meta.json of prepare.py"),
    ("short train.bin", "train.bin holds "),
    ("long train.bin", "train.bin holds "),  # (a longer one would fail later, at a batch, with a wrong message)
    ("empty val.bin", "val.bin holds 0 bytes but meta.json says "),
    ("no val.bin", "val.bin is missing"),
    ("other tokenizer.json", "tokenizer.json is not the tokenizer that made this data (its sha256 differs"),
    ("no tokenizer.json", "tokenizer.json is missing"),
    ("old meta, no tokenizer.json", "tokenizer.json is missing"),
])
def test_a_damaged_data_folder_is_one_line_at_start_up(tmp_path, capsys, damage, message):
    data = tmp_path / "data"
    meta = make_bpe_data(data, "apples")
    text = (data / "meta.json").read_text()
    if damage == "empty":
        (data / "meta.json").write_text("")
    elif damage == "truncated":
        (data / "meta.json").write_text(text[:len(text) // 2])
    elif damage == "binary":
        (data / "meta.json").write_bytes(b"\x89PNG\xff\xfe\x00")
    elif damage == "a list":
        (data / "meta.json").write_text("[1, 2]")
    elif damage == "no dtype":
        (data / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "dtype"}))
    elif damage == "short train.bin":
        with open(data / "train.bin", "r+b") as f:
            f.truncate(f.seek(0, 2) - 2)
    elif damage == "long train.bin":
        with open(data / "train.bin", "ab") as f:
            f.write(b"\0\0")
    elif damage == "empty val.bin":
        (data / "val.bin").write_bytes(b"")
    elif damage == "no val.bin":
        (data / "val.bin").unlink()
    elif damage in ("no tokenizer.json", "old meta, no tokenizer.json"):
        (data / "tokenizer.json").unlink()
        if damage.startswith("old meta"):  # as prepare.py wrote it before it recorded the hash
            (data / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "tokenizer_sha256"}))
    elif damage == "other tokenizer.json":
        prepare.train_bpe(300, iter([["zebra zoo " * 20] * 10]), str(data / "tokenizer.json"))
    before = snapshot(data)
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY)
    assert message in err and f"re-run prepare.py to rebuild {data}" in err
    if damage in ("short train.bin", "long train.bin"):
        assert f"but meta.json says {meta['train']['tokens']:,} uint16 tokens" in err and "half-copied" in err
    assert not (tmp_path / "out").exists()  # found before anything was written
    assert snapshot(data) == before


def test_too_little_data_for_the_context_is_found_at_start_up(tmp_path, capsys):
    data = tmp_path / "data"
    make_bpe_data(data, "apples")
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY,
                         "--block_size=4096", "--eval_interval=100")
    assert "split has" in err and "fewer than block_size + 1 = 4097" in err
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_out_dir_that_is_a_file_or_read_only(tmp_path, capsys):
    data = tmp_path / "data"
    make_bpe_data(data, "apples")
    (tmp_path / "out").write_bytes(b"my file")
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY)
    assert err == f"--out_dir={tmp_path / 'out'} is a file, not a folder: choose another --out_dir"
    assert (tmp_path / "out").read_bytes() == b"my file"
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "ro").mkdir(mode=0o555)
        err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={tmp_path / 'ro'}", *TINY)
        assert "cannot write to --out_dir=" in err and "(Permission denied)" in err
        assert os.listdir(tmp_path / "ro") == []


def test_nan_before_any_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    import torch

    import train

    data = tmp_path / "data"
    make_bpe_data(data, "apples")
    real_forward = train.GPT.forward

    def forward_nan(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        return logits, (loss * float("nan") if torch.is_grad_enabled() else loss)

    monkeypatch.setattr(train.GPT, "forward", forward_nan)
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={tmp_path / 'out'}", *TINY,
                         "--max_iters=10", "--eval_interval=5")
    assert err.startswith("the loss became nan at iter 1; no checkpoint was saved before it. Try")
    assert "keeps the last good checkpoint" not in err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def train_cli(data, out, *flags):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), f"--data_dir={data}", f"--out_dir={out}",
                             *TINY, *flags], cwd=ROOT, env=PY_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for_line(proc, start):
    for line in proc.stdout:
        if line.startswith(start):
            return line
    raise AssertionError(f"no line starting {start!r}; stderr: {proc.stderr.read()}")


def test_ctrl_c_during_start_up_is_one_line_and_130(tmp_path):
    data = tmp_path / "data"
    make_bpe_data(data, "apples")
    proc = train_cli(data, tmp_path / "out", "--max_iters=100000", "--peak_flops=0")  # a CPU matmul at start-up
    wait_for_line(proc, "config:")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == "train.py: interrupted\n", err
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def wait_until_torch_is_loading(proc):
    """Until torch's libraries are mapped into proc (Linux), so past Python's start-up however loaded the machine."""
    maps = f"/proc/{proc.pid}/maps"
    if not os.path.exists(maps):
        time.sleep(0.25)  # about where `import torch` starts on an idle machine; it lasts a second or more
        return
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the script ended before loading torch: {proc.stderr.read()}")
        with open(maps) as f:
            if "/torch/" in f.read():  # torch/lib/libtorch*.so
                return
        time.sleep(0.005)
    raise AssertionError("the script never started loading torch")


@pytest.mark.parametrize("script", ["train.py", "export.py"])
def test_ctrl_c_while_torch_loads_is_one_line_and_130(script):
    """Before run_main runs: a script that imports torch at its top spends a second or more there."""
    proc = subprocess.Popen([sys.executable, script, "--out_dir=/nonexistent"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_until_torch_is_loading(proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == f"{script}: interrupted\n", err


def test_a_second_ctrl_c_in_training_is_one_line_and_130(tmp_path):
    data = tmp_path / "data"
    make_bpe_data(data, "apples")
    out = tmp_path / "out"
    proc = train_cli(data, out, "--max_iters=100000", "--eval_interval=100000")
    wait_for_line(proc, "iter 2/")
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("train.py: interrupted") and "Traceback" not in err
    assert not [name for name in os.listdir(out) if name.endswith(".tmp")]  # no half-written checkpoint
    if (out / "ckpt.pt").exists():  # (when the first Ctrl-C's save finished before the second one came)
        import torch

        assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] >= 2


# -----------------------------------------------------------------------------
# sample.py and export.py: a run's folder


def sample_main(argv):
    import sample

    return sample.main(argv)


def export_main(argv):
    import export

    return export.main(argv)


def test_a_swapped_tokenizer_beside_the_checkpoint_is_refused(trained, tmp_path, capsys):
    data, out = trained
    make_bpe_data(tmp_path / "other", "rockets and stars")
    (out / "tokenizer.json").write_bytes((tmp_path / "other" / "tokenizer.json").read_bytes())
    before = snapshot(tmp_path)
    for main in (sample_main, export_main):
        err = one_line_error(capsys, main, f"--out_dir={out}", "--device=cpu" if main is sample_main else
                             f"--hf_dir={tmp_path / 'hf'}")
        assert f"{out / 'tokenizer.json'} is not the tokenizer the checkpoint was made with" in err
        assert err.endswith(f"copy the tokenizer.json of the data folder this run was trained on into {out}")
    assert snapshot(tmp_path) == before


def test_a_missing_tokenizer_beside_the_checkpoint_says_copy_it(trained, tmp_path, capsys):
    data, out = trained
    (out / "tokenizer.json").unlink()
    before = snapshot(tmp_path)
    for main in (sample_main, export_main):
        err = one_line_error(capsys, main, f"--out_dir={out}", "--device=cpu" if main is sample_main else
                             f"--hf_dir={tmp_path / 'hf'}")
        assert err.endswith(f"not found at {out / 'tokenizer.json'}: copy tokenizer.json from the data folder this "
                            f"run was trained on into {out}")
        assert "prepare.py" not in err
    assert snapshot(tmp_path) == before


def test_re_export_replaces_only_its_own_files(trained, tmp_path):
    data, out = trained
    hf = tmp_path / "hf"
    export_main([f"--out_dir={out}", f"--hf_dir={hf}"])
    exported = snapshot(hf)
    # a Hugging Face repo clone: its .git, the user's notes and a folder of their own
    (hf / ".git").mkdir()
    (hf / ".git" / "HEAD").write_bytes(b"ref: refs/heads/main\n")
    (hf / "notes.md").write_bytes(b"my notes \xe2\x9c\x8d\n")
    (hf / "eval").mkdir()
    (hf / "eval" / "results.json").write_bytes(b"{}")
    run_train(data, out, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    export_main([f"--out_dir={out}", f"--hf_dir={hf}"])
    after = snapshot(hf)
    assert {k: after[k] for k in (".git/HEAD", "notes.md", "eval/results.json")} == {
        ".git/HEAD": b"ref: refs/heads/main\n", "notes.md": b"my notes \xe2\x9c\x8d\n", "eval/results.json": b"{}"}
    assert set(after) == set(exported) | {".git/HEAD", "notes.md", "eval/results.json"}
    assert after["model.safetensors"] != exported["model.safetensors"]  # the new weights
    assert [n for n in os.listdir(tmp_path) if n.startswith(".hf")] == []  # no temporary folders left


def test_a_fresh_repo_clone_takes_an_export(trained, tmp_path):
    data, out = trained
    hf = tmp_path / "clone"
    (hf / ".git").mkdir(parents=True)
    (hf / ".gitattributes").write_bytes(b"*.safetensors filter=lfs\n")
    export_main([f"--out_dir={out}", f"--hf_dir={hf}"])
    assert (hf / ".gitattributes").read_bytes() == b"*.safetensors filter=lfs\n" and (hf / "config.json").exists()


@pytest.mark.parametrize("fault", ["disk full", "Ctrl-C"])
def test_a_failed_re_export_puts_the_earlier_one_back(trained, tmp_path, monkeypatch, capsys, fault):
    data, out = trained
    hf = tmp_path / "hf"
    export_main([f"--out_dir={out}", f"--hf_dir={hf}"])
    (hf / "notes.md").write_bytes(b"mine")
    before = snapshot(hf)
    run_train(data, out, "--max_iters=6", "--eval_interval=2", "--init_from=resume")
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 5:  # some files are new, others still old
            raise OSError(28, "No space left on device") if fault == "disk full" else KeyboardInterrupt()
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    if fault == "disk full":
        assert "No space left on device" in one_line_error(capsys, export_main, f"--out_dir={out}", f"--hf_dir={hf}")
    else:
        with pytest.raises(SystemExit) as e:
            cli.run_main(export_main, [f"--out_dir={out}", f"--hf_dir={hf}"])
        assert e.value.code == 130 and capsys.readouterr().err.endswith(": interrupted\n")
    assert snapshot(hf) == before
    assert [n for n in os.listdir(tmp_path) if n.startswith(".hf")] == []


# -----------------------------------------------------------------------------
# sample.py as a process: signals, pipes, locale, and sampling settings at the edges


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    make_bpe_data(root / "data", "apples and pears")
    run_train(root / "data", root / "out", "--max_iters=2", "--eval_interval=2")
    return root / "out"


def sample_cli(run_dir, *flags, **kwargs):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "sample.py"), f"--out_dir={run_dir}", "--device=cpu",
                             *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=kwargs.get("env", PY_ENV))


def test_ctrl_c_while_sampling_is_one_line_and_130(run_dir):
    before = snapshot(run_dir)
    proc = sample_cli(run_dir, "--max_new_tokens=1000000", "--stop_at_eot=False", "--num_samples=1")
    assert proc.stdout.read(20)  # generating
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and err == b"sample.py: interrupted\n", err
    assert snapshot(run_dir) == before


def test_output_into_a_closed_pipe_ends_quietly(run_dir):
    proc = sample_cli(run_dir, "--max_new_tokens=1000000", "--stop_at_eot=False", "--num_samples=1")
    assert proc.stdout.read(20)
    proc.stdout.close()  # as `| head -c 20` does
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 141 and err == b"", err


def test_an_ascii_locale_with_a_non_ascii_prompt(run_dir):
    import sample

    env = dict(PY_ENV, LC_ALL="C", PYTHONUTF8="0")
    env.pop("PYTHONIOENCODING", None)
    proc = sample_cli(run_dir, "--prompt", "Café 🍰", "--max_new_tokens=5", "--num_samples=1", "--seed=3", env=env)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == b"", err
    model, tokenizer = sample.load_model(str(run_dir), device="cpu")
    expected = sample.generate_text(model, tokenizer, "Café 🍰", 1, 5, seed=3)[0]
    # an ASCII console shows what it cannot as '?'; the model was given the real prompt
    assert out.decode("ascii") == ("Café 🍰" + expected).encode("ascii", "replace").decode() + "\n" + "-" * 15 + "\n"


@pytest.mark.parametrize("temperature", [1e-30, 1e-45, 5e-324])
def test_a_tiny_temperature_is_greedy_not_a_crash(run_dir, temperature):
    import sample

    model, tokenizer = sample.load_model(str(run_dir), device="cpu")
    greedy = sample.generate_text(model, tokenizer, "Tom had", 2, 12, temperature=0, stop_at_eot=False)
    tiny = sample.generate_text(model, tokenizer, "Tom had", 2, 12, temperature=temperature, stop_at_eot=False)
    assert tiny == greedy


# -----------------------------------------------------------------------------
# more of the same kind


def test_seeds_beyond_what_the_generators_take_are_one_line_errors(trained, capsys):
    data, out = trained
    before = snapshot(out)
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={out}", *TINY, "--seed=1000000000",
                         "--init_from=resume")
    assert err == "--seed must be from 0 to 99,999,999, got 1000000000"
    err = one_line_error(capsys, sample_main, f"--out_dir={out}", "--device=cpu", f"--seed={2**64}")
    assert err == f"--seed must be from -2**63 to 2**64 - 1, got {2**64}"
    assert snapshot(out) == before


def test_resume_after_a_log_row_was_cut_short(trained, capsys):
    data, out = trained
    rows = (out / "log.jsonl").read_text().splitlines()
    with open(out / "log.jsonl", "a") as f:
        f.write('{"iter": 6, "tokens": 38')  # a crash while appending
    run_train(data, out, "--max_iters=6", "--eval_interval=2", "--init_from=resume", "--plot=True")
    after = (out / "log.jsonl").read_text().splitlines()
    assert after[:2] == rows[:2] and [json.loads(line)["iter"] for line in after] == [0, 2, 4, 6]  # 4 is redone
    assert (out / "loss.png").stat().st_size > 1000


def test_prepare_never_writes_into_a_training_run(trained, capsys):
    data, out = trained
    (data / "train.txt").write_text("".join(f"Story {i}.\n<|endoftext|>\n" for i in range(20)))
    before = snapshot(out)
    err = one_line_error(capsys, prepare.main, f"--train_files={data / 'train.txt'}", f"--data_dir={out}",
                         f"--cache_dir={data / 'hf-cache'}")
    assert err == f"--data_dir={out} holds a training run (ckpt.pt): give the data a folder of its own"
    assert snapshot(out) == before


@pytest.mark.parametrize("case", ["not parquet", "empty dataset folder"])
def test_unreadable_sources_are_one_line_errors(tmp_path, capsys, case):
    if case == "not parquet":
        (tmp_path / "train.parquet").write_bytes(b"PAR1 but not really" * 50)
        flags = [f"--train_files={tmp_path / 'train.parquet'}"]
        message = f"datasets could not read {tmp_path / 'train.parquet'} (Parquet magic bytes not found"
    else:
        (tmp_path / "hub").mkdir()
        flags = [f"--dataset={tmp_path / 'hub'}"]
        message = "doesn't contain any data files: give --dataset a folder of .parquet"
    before = snapshot(tmp_path)
    err = one_line_error(capsys, prepare.main, *flags, f"--data_dir={tmp_path / 'out'}",
                         f"--cache_dir={tmp_path / 'hf-cache'}")
    assert message in err
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(("hf-cache", "out"))} == before
    assert not (tmp_path / "out" / "meta.json").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_a_full_disk_while_saving_keeps_the_last_checkpoint(trained, capsys):
    data, out = trained
    before = (out / "ckpt.pt").read_bytes()
    os.symlink("/dev/full", out / "ckpt.pt.tmp")  # the next checkpoint is written there: ENOSPC at the first write
    err = one_line_error(capsys, train_main, f"--data_dir={data}", f"--out_dir={out}", *TINY, "--max_iters=6",
                         "--eval_interval=2", "--init_from=resume")
    assert err.startswith(f"saving {out / 'ckpt.pt'} failed (") and "check the free space" in err
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.lexists(out / "ckpt.pt.tmp")


def test_a_full_disk_elsewhere_is_one_line(trained, capsys, monkeypatch):
    import errno

    import train

    data, out = trained

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "log.jsonl"))

    monkeypatch.setattr(train, "plot_losses", full)
    err = one_line_error(capsys, train.main_with_memory_hint, f"--data_dir={data}", f"--out_dir={out}", *TINY,
                         "--max_iters=6", "--eval_interval=2", "--init_from=resume", "--plot=True")
    assert err == (f"writing {out / 'log.jsonl'} failed (No space left on device): free some space, then continue "
                   "with --init_from=resume (ckpt.pt is only ever replaced whole)")


def test_prepare_never_replaces_a_tokenizer_it_did_not_write(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("".join(f"Story {i}.\n<|endoftext|>\n" for i in range(20)))
    (tmp_path / "hf").mkdir()  # an export: its tokenizer.json
    (tmp_path / "hf" / "tokenizer.json").write_bytes(b'{"version": "1.0"}')
    before = snapshot(tmp_path / "hf")
    err = one_line_error(capsys, prepare.main, f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0.2",
                         f"--data_dir={tmp_path / 'hf'}", f"--cache_dir={tmp_path / 'hf-cache'}")
    assert err.startswith(f"--data_dir={tmp_path / 'hf'} holds a tokenizer.json that prepare.py did not write")
    assert snapshot(tmp_path / "hf") == before


def test_every_story_held_out_says_lower_val_fraction(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("One.\n<|endoftext|>\n")
    err = one_line_error(capsys, prepare.main, f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0.99",
                         "--seed=0", f"--data_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'hf-cache'}")
    assert err == (f"every story of {tmp_path / 'train.txt'} was held out for val: lower --val_fraction=0.99, or give "
                   "validation files with --val_files")
    assert not (tmp_path / "out" / "meta.json").exists()
