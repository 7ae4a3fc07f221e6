"""prepare.py on tiny corpora made here: token-exact output for every format, meta.json, re-runs, crashes, errors."""

import dataclasses
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

import prepare
from cli import UserError
from prepare import EOT_TEXT, load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENC = tiktoken.get_encoding("gpt2")

# Stories that try the edges: literal end-of-text text (mid-line and at the start of a line), non-ASCII, Windows line
# ends, tabs, runs of spaces, leading and trailing spaces. None holds a blank line or a line that is only <|endoftext|>,
# the two things that separate stories in .txt files.
STORIES = [
    "Once upon a time, there was a little cat named Tom.\nTom liked to play in the sun.",
    "Lily saw a sign that said <|endoftext|> and laughed.\n<|endoftext|> is only text here.",
    "Café, naïve, 世界, 🌍🚀 and “curly quotes” with ‘apostrophes’ — done.",
    "Windows line\r\nends\r\nare here.",
    "Tabs\tand   runs   of spaces,  ",
    "  A story that starts with spaces.",
    "The end.",
]
TXT_STORIES = [s.replace("\r\n", "\n") for s in STORIES]  # what .txt files give back (they are read as text)


def gpt2_ids(stories):
    return np.array([t for s in stories for t in ENC.encode_ordinary(s) + [ENC.eot_token]], dtype=np.uint16)


def run(tmp_path, *flags, out="out"):
    return prepare.main([f"--data_dir={tmp_path / out}", f"--cache_dir={tmp_path / 'hf-cache'}", *flags])


def tokens(data_dir, split):
    with open(os.path.join(data_dir, "meta.json")) as f:
        meta = json.load(f)
    return np.fromfile(os.path.join(data_dir, meta[split]["file"]), dtype=meta["dtype"])


def write_official_txt(path, stories, newline="\n"):
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write("".join(s.replace("\r\n", "\n") + "\n<|endoftext|>\n" for s in stories))


def write_blank_line_txt(path, stories):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n\n".join(stories) + "\n")


def write_column_file(path, stories, column="text"):
    if path.suffix == ".parquet":
        pq.write_table(pa.table({column: stories}), path)
    elif path.suffix == ".json":
        path.write_text(json.dumps([{column: s} for s in stories]), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({column: s}) + "\n" for s in stories), encoding="utf-8")


# -----------------------------------------------------------------------------
# token-exact output


@pytest.mark.parametrize("kind", ["official.txt", "official-crlf.txt", "blank-lines.txt", "parquet", "json", "jsonl"])
def test_token_exact_for_every_format(tmp_path, kind):
    train, val = STORIES, ["A short val story.", "Another one, with ünïcödé and <|endoftext|>."]
    if kind.endswith(".txt"):
        files = tmp_path / "train.txt", tmp_path / "val.txt"
        for path, stories in zip(files, (train, val)):
            if kind == "blank-lines.txt":
                write_blank_line_txt(path, stories)
            else:
                write_official_txt(path, stories, newline="\r\n" if "crlf" in kind else "\n")
        # .txt files are read as text: '\r\n' becomes '\n' (documented in prepare.py); nothing else changes.
        train = TXT_STORIES
    else:
        files = tmp_path / f"train.{kind}", tmp_path / f"val.{kind}"
        for path, stories in zip(files, (train, val)):
            write_column_file(path, stories)
    meta = run(tmp_path, f"--train_files={files[0]}", f"--val_files={files[1]}")
    out = tmp_path / "out"
    assert np.array_equal(tokens(out, "train"), gpt2_ids(train))
    assert np.array_equal(tokens(out, "val"), gpt2_ids(val))
    with open(out / "meta.json") as f:
        assert json.load(f) == meta
    assert meta["tokenizer"] == "gpt2" and meta["tokenizer_file"] is None and not (out / "tokenizer.json").exists()
    assert (meta["vocab_size"], meta["eot_token"], meta["dtype"]) == (50257, 50256, "uint16")
    for split, stories in (("train", train), ("val", val)):
        assert meta[split] == {"file": f"{split}.bin", "tokens": len(gpt2_ids(stories)), "stories": len(stories),
                               "bytes": sum(len(s.encode("utf-8")) for s in stories)}
    assert meta["settings"]["train_files"][0]["path"] == str(files[0])
    assert meta["source"] == {"train": str(files[0]), "val": str(files[1])}


def test_column_formats_keep_text_exactly_and_skip_empty_rows(tmp_path):
    stories = ["\nA row may start with a line break,", "end with one\n", "", "   ", "keep a lone \r and \r\n too\r\n"]
    write_column_file(tmp_path / "train.jsonl", stories)
    write_column_file(tmp_path / "val.jsonl", ["v"])
    meta = run(tmp_path, f"--train_files={tmp_path / 'train.jsonl'}", f"--val_files={tmp_path / 'val.jsonl'}")
    kept = [s for s in stories if s.strip()]
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(kept))
    assert meta["train"]["stories"] == 3


def test_mis_encoded_punctuation_of_the_hub_release_is_repaired(tmp_path):
    # As in the Hugging Face parquet files: UTF-8 read as Windows-1252; ” lost its last byte.
    broken = ["â€œHi,â€ said Lily. â€œIâ€™m here.â€", "Wait â€” a dog â€˜ranâ€™ offâ€¦", "Café, naïve: fine.",
              "â€¢ a bullet, â€\x9d kept whole"]
    fixed = ["“Hi,” said Lily. “I’m here.”", "Wait — a dog ‘ran’ off…", "Café, naïve: fine.", "• a bullet, ” kept whole"]
    assert [prepare.fix_mojibake(s) for s in broken] == fixed
    write_column_file(tmp_path / "train.parquet", broken)
    write_column_file(tmp_path / "val.parquet", broken[:1])
    files = [f"--train_files={tmp_path / 'train.parquet'}", f"--val_files={tmp_path / 'val.parquet'}"]
    meta = run(tmp_path, *files)
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(fixed))
    assert meta["train"]["bytes"] == sum(len(s.encode("utf-8")) for s in fixed)
    run(tmp_path, *files, "--fix_mojibake=False", out="raw")  # kept as it is when asked
    assert np.array_equal(tokens(tmp_path / "raw", "train"), gpt2_ids(broken))


def test_txt_stories_split_across_chunks_files_and_threads(tmp_path, monkeypatch):
    # Many lines and tiny chunks: stories run across chunk boundaries and are carried over; several threads encode at
    # once and the ids still come out in order, although every third chunk is made to finish after the two that
    # follow it (a writer that wrote chunks as they finished would scramble the stories). The first file does not
    # end in a line break and the next story must not run into it.
    calls, real_encode = itertools.count(), prepare.Tokenizer.encode_stories

    def every_third_chunk_slow(self, stories):
        if next(calls) // 2 % 3 == 0:  # two calls a chunk: its train and val stories
            time.sleep(0.05)
        return real_encode(self, stories)

    monkeypatch.setattr(prepare.Tokenizer, "encode_stories", every_third_chunk_slow)
    rng = random.Random(0)
    stories = [f"Story {i}.\n" + "\n".join(f"Line {j}, {'la ' * rng.randrange(9)}" for j in range(rng.randrange(1, 8)))
               for i in range(900)]
    (tmp_path / "a.txt").write_text("\n<|endoftext|>\n".join(stories[:500]))  # official, no final separator
    write_blank_line_txt(tmp_path / "b.txt", stories[500:])
    write_official_txt(tmp_path / "val.txt", ["v1", "v2"])
    run(tmp_path, f"--train_files={tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", f"--val_files={tmp_path / 'val.txt'}",
        "--chunk_mb=0.001", "--num_workers=3")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(stories))


def test_held_out_val_is_deterministic_and_partitions_the_stories(tmp_path):
    stories = [f"Story number {i}." for i in range(400)]
    write_official_txt(tmp_path / "all.txt", stories)
    meta = run(tmp_path, f"--train_files={tmp_path / 'all.txt'}", "--val_fraction=0.1")
    ids = {split: tokens(tmp_path / "out", split) for split in ("train", "val")}
    # Decode story by story: together the two splits hold every story once, each in the original order.
    split_stories = {s: ENC.decode(ids[s].tolist()).split(EOT_TEXT)[:-1] for s in ids}
    assert sorted(split_stories["train"] + split_stories["val"], key=stories.index) == stories
    assert split_stories["train"] == [s for s in stories if s in set(split_stories["train"])]
    assert 20 <= meta["val"]["stories"] <= 60 and meta["train"]["stories"] + meta["val"]["stories"] == 400
    assert meta["source"]["val"] == "0.1 of the training stories held out (seed 1337)"
    run(tmp_path, f"--train_files={tmp_path / 'all.txt'}", "--val_fraction=0.1", "--chunk_mb=0.0001", out="again")
    assert np.array_equal(tokens(tmp_path / "again", "val"), ids["val"])  # the same stories, however it is chunked
    run(tmp_path, f"--train_files={tmp_path / 'all.txt'}", "--val_fraction=0.1", "--seed=7", out="other-seed")
    assert not np.array_equal(tokens(tmp_path / "other-seed", "val"), ids["val"])
    write_official_txt(tmp_path / "a.txt", stories[:200])  # the same stories in two files: one draw per story still,
    write_official_txt(tmp_path / "b.txt", stories[200:])  # not the same story positions held out of each file
    run(tmp_path, f"--train_files={tmp_path / 'a.txt'},{tmp_path / 'b.txt'}", "--val_fraction=0.1", out="two-files")
    assert np.array_equal(tokens(tmp_path / "two-files", "val"), ids["val"])


def test_hub_code_path_offline_on_a_local_dataset_folder(tmp_path):
    # load_dataset(name) with a folder for a name: the same call as for the hub, with no network.
    hub = tmp_path / "hub"
    hub.mkdir()
    write_column_file(hub / "train.jsonl", STORIES, column="story")
    write_column_file(hub / "validation.jsonl", ["Val story."], column="story")
    meta = run(tmp_path, f"--dataset={hub}", "--text_column=story")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(STORIES))
    assert np.array_equal(tokens(tmp_path / "out", "val"), gpt2_ids(["Val story."]))
    assert meta["source"] == {"dataset": str(hub), "train": "split train", "val": "split validation"}
    assert meta["settings"]["dataset"] == str(hub)
    write_column_file(hub / "train.jsonl", STORIES[:1], column="story")  # edited in place: rebuilt, not "up to date"
    run(tmp_path, f"--dataset={hub}", "--text_column=story")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(STORIES[:1]))
    # Without a validation split, val_fraction of train is held out.
    (hub / "validation.jsonl").unlink()
    write_column_file(hub / "train.jsonl", [f"Story {i}." for i in range(300)], column="story")
    meta = run(tmp_path, f"--dataset={hub}", "--text_column=story", "--val_fraction=0.05", out="holdout")
    assert meta["train"]["stories"] + meta["val"]["stories"] == 300 and meta["val"]["stories"] > 0


@pytest.mark.parametrize("kind", ["official.txt", "blank-lines.txt"])
def test_a_dataset_folder_of_txt_files_splits_stories_as_local_files_do(tmp_path, kind):
    # datasets reads a folder of .txt files as a row per line: the stories must come out whole all the same
    hub = tmp_path / "hub"
    hub.mkdir()
    for name, stories in (("train.txt", STORIES), ("validation.txt", ["Val story,\nover two lines."])):
        if kind == "official.txt":
            write_official_txt(hub / name, stories)
        else:
            write_blank_line_txt(hub / name, [s.replace("\r\n", "\n") for s in stories])
    run(tmp_path, f"--dataset={hub}")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(TXT_STORIES))
    assert np.array_equal(tokens(tmp_path / "out", "val"), gpt2_ids(["Val story,\nover two lines."]))


def test_a_byte_order_mark_is_not_part_of_the_first_story(tmp_path):
    write_official_txt(tmp_path / "plain.txt", STORIES)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.txt").read_bytes())  # as Notepad saves
    write_official_txt(tmp_path / "val.txt", ["Val story."])
    run(tmp_path, f"--train_files={tmp_path / 'bom.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(TXT_STORIES))


# -----------------------------------------------------------------------------
# re-runs and crashes


def prepare_small(tmp_path, *flags):
    write_official_txt(tmp_path / "train.txt", STORIES)
    write_official_txt(tmp_path / "val.txt", ["Val story."])
    return run(tmp_path, f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}", *flags)


def test_rerun_with_same_settings_reads_nothing(tmp_path, monkeypatch, capsys):
    prepare_small(tmp_path)
    flags = [f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}"]
    out = tmp_path / "out"
    stamps = {p: os.stat(out / p).st_mtime_ns for p in ("train.bin", "val.bin", "meta.json")}
    calls = []
    real_load = prepare.load_sources
    monkeypatch.setattr(prepare, "load_sources", lambda *a: calls.append(a) or real_load(*a))
    start = time.perf_counter()
    run(tmp_path, *flags)
    assert time.perf_counter() - start < 1 and calls == []
    assert "is up to date" in capsys.readouterr().out
    assert {p: os.stat(out / p).st_mtime_ns for p in stamps} == stamps
    # --force, another setting, a changed input or a damaged output: each rebuilds.
    run(tmp_path, *flags, "--force=True")
    assert len(calls) == 1
    meta = run(tmp_path, *flags, "--dtype=uint32")
    assert len(calls) == 2 and meta["dtype"] == "uint32"
    assert np.array_equal(tokens(out, "train"), gpt2_ids(TXT_STORIES))
    write_official_txt(tmp_path / "train.txt", STORIES + ["One more."])
    meta = run(tmp_path, *flags, "--dtype=uint32")
    assert len(calls) == 3 and meta["train"]["stories"] == len(STORIES) + 1
    with open(out / "val.bin", "r+b") as f:
        f.truncate(2)
    run(tmp_path, *flags, "--dtype=uint32")
    assert len(calls) == 4 and np.array_equal(tokens(out, "val"), gpt2_ids(["Val story."]))


def snapshot(data_dir):
    return {p: (data_dir / p).read_bytes() for p in sorted(os.listdir(data_dir))}


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), OSError(28, "No space left on device")])
def test_crash_while_encoding_keeps_the_old_output(tmp_path, monkeypatch, fault):
    write_official_txt(tmp_path / "train.txt", [f"Story {i} " + "la " * 300 for i in range(300)])
    flags = [f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0.1", "--chunk_mb=0.01"]
    run(tmp_path, *flags)
    before = snapshot(tmp_path / "out")
    calls = []
    real = prepare.Tokenizer.encode_stories

    def failing(self, stories):  # fails after a few chunks have been written to the temporary files
        calls.append(1)
        if len(calls) == 12:
            raise fault
        return real(self, stories)

    monkeypatch.setattr(prepare.Tokenizer, "encode_stories", failing)
    with pytest.raises(type(fault) if isinstance(fault, KeyboardInterrupt) else UserError) as e:
        run(tmp_path, *flags, "--seed=2")
    if isinstance(fault, OSError):
        assert "No space left on device" in str(e.value)
    assert len(calls) > 12
    assert snapshot(tmp_path / "out") == before  # untouched, and no .tmp file left behind


def test_crash_while_swapping_files_leaves_no_meta(tmp_path, monkeypatch):
    prepare_small(tmp_path)
    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # train.bin is new, val.bin still old
            raise OSError(5, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_die)
    with pytest.raises(UserError, match="Input/output error"):
        prepare_small(tmp_path, "--seed=2", "--force=True")
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(os.listdir(tmp_path / "out")) == ["train.bin", "val.bin"]  # no meta.json: nothing is trusted
    assert prepare_small(tmp_path)["train"]["stories"] == len(STORIES)  # and the next run rebuilds


def signal_mid_write(tmp_path, signum):
    """Build a dataset, start rebuilding it with another seed, and send signum while train.bin.tmp is being written.
    Returns the rebuild command, the first build's files and the signalled process."""
    corpus = tmp_path / "train.txt"
    write_official_txt(corpus, [f"Story {i}: " + "the cat sat on the mat. " * 40 for i in range(5000)])
    base = [sys.executable, os.path.join(ROOT, "prepare.py"), f"--train_files={corpus}", "--val_fraction=0.01",
            f"--data_dir={tmp_path / 'out'}", f"--cache_dir={tmp_path / 'hf-cache'}", "--chunk_mb=0.002", "--seed=2"]
    subprocess.run(base[:-1], check=True, capture_output=True)
    old = snapshot(tmp_path / "out")
    proc = subprocess.Popen(base, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tmp_bin = tmp_path / "out" / "train.bin.tmp"
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline and not (tmp_bin.exists() and tmp_bin.stat().st_size > 0):
        time.sleep(0.005)
    assert tmp_bin.exists(), "the signal must land while train.bin.tmp is being written"
    proc.send_signal(signum)
    return base, old, proc


def test_kill_9_mid_write_leaves_no_trusted_mismatch(tmp_path):
    base, old, proc = signal_mid_write(tmp_path, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    files = snapshot(tmp_path / "out")
    meta = json.loads(files["meta.json"]) if "meta.json" in files else None
    if meta is not None and meta["settings"]["seed"] == 1337:  # killed before the swap: the old output, whole
        assert {p: files[p] for p in old} == old
    elif meta is not None:  # (only if the kill came too late) the new output, whole
        assert len(files["train.bin"]) == 2 * meta["train"]["tokens"]
    subprocess.run(base, check=True, capture_output=True)
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".tmp")]


def test_sigterm_mid_write_keeps_the_old_output_and_leaves_no_temporary_files(tmp_path):
    _, old, proc = signal_mid_write(tmp_path, signal.SIGTERM)  # timeout's, or a job scheduler's: as Ctrl-C
    assert proc.wait() == 130 and proc.stderr.read().endswith("\nprepare.py: interrupted\n")  # (after the bar)
    assert snapshot(tmp_path / "out") == old  # the old output whole, and no .tmp file left behind


# -----------------------------------------------------------------------------
# bpe:N


def test_bpe_n_has_n_tokens_and_a_gpt2_rebuild_drops_its_tokenizer_json(tmp_path):
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randrange(2, 8))) for _ in range(3000)]
    write_official_txt(tmp_path / "train.txt", [" ".join(rng.choice(words) for _ in range(60)) for _ in range(300)])
    write_official_txt(tmp_path / "val.txt", ["A val story."])
    files = [f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}"]
    meta = run(tmp_path, *files, "--tokenizer=bpe:300")
    assert meta["vocab_size"] == 300 == load_tokenizer(meta, str(tmp_path / "out")).vocab_size  # the end of text too
    meta = run(tmp_path, *files, "--tokenizer=gpt2")  # the same folder, now GPT-2 tokens: no tokenizer.json of bpe's
    assert meta["tokenizer_file"] is None and not (tmp_path / "out" / "tokenizer.json").exists()


def test_bpe_trains_saves_and_round_trips_any_text(tmp_path):
    write_official_txt(tmp_path / "train.txt", STORIES * 20)
    write_official_txt(tmp_path / "val.txt", ["A val story about Tom."])
    meta = run(tmp_path, f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}",
               "--tokenizer=bpe:400")
    out = tmp_path / "out"
    assert meta["tokenizer"] == "bpe:400" and meta["tokenizer_file"] == "tokenizer.json" and meta["dtype"] == "uint16"
    assert 257 < meta["vocab_size"] <= 400
    assert json.loads((out / "tokenizer.json").read_text())["model"]["type"] == "BPE"
    tok = load_tokenizer(meta, str(out))
    assert tok.eot_token == meta["eot_token"] and tok.vocab_size == meta["vocab_size"]
    # train.bin is each story's ids and the end-of-text id, and decodes back to the stories (with \n line ends)
    ids = tokens(out, "train").tolist()
    expected = [t for s in TXT_STORIES * 20 for t in tok.encode(s) + [tok.eot_token]]
    assert ids == expected and ids.count(tok.eot_token) == len(STORIES) * 20
    assert tok.decode(ids) == "".join(s + EOT_TEXT for s in TXT_STORIES * 20)
    # decode(encode(text)) == text for any UTF-8, including characters the training text never had
    rng = random.Random(0)
    alphabet = "ab \t\r\n<|>" + "éü世界🌍🚀\u0301\u200b\x00\x7f"
    texts = ["", "\r\n\r\n", "   ", EOT_TEXT, f"x{EOT_TEXT}y", "日本語のテキスト", "🧪🧬 emoji", "\ufeffBOM"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randrange(40))) for _ in range(200)]
    texts += ["".join(chr(rng.choice([rng.randrange(32, 0xD800), rng.randrange(0xE000, 0x110000)]))
                      for _ in range(rng.randrange(30))) for _ in range(200)]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
        assert tok.eot_token not in tok.encode(text)  # literal end-of-text text is never the special token


# -----------------------------------------------------------------------------
# errors: one line each, naming the problem and the fix


def error_of(tmp_path, *flags, out="out"):
    with pytest.raises(UserError) as e:
        run(tmp_path, *flags, out=out)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_errors_for_bad_files_columns_and_splits(tmp_path):
    assert "--train_files: no file matches" in error_of(tmp_path, f"--train_files={tmp_path / 'missing.txt'}")
    assert "no file matches" in error_of(tmp_path, f"--train_files={tmp_path / '*.parquet'}")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    assert "use .txt, .parquet, .json or .jsonl" in error_of(tmp_path, f"--train_files={tmp_path / 'data.csv'}")
    assert "--val_files needs --train_files" in error_of(tmp_path, f"--val_files={tmp_path / 'data.csv'}")
    write_column_file(tmp_path / "stories.parquet", STORIES, column="story")
    message = error_of(tmp_path, f"--train_files={tmp_path / 'stories.parquet'}")
    assert "has no column 'text' (it has story)" in message and "--text_column=NAME" in message
    (tmp_path / "empty.txt").write_text("")
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / 'empty.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert message.startswith("the train split is empty (no stories in ") and "--train_files" in message
    write_official_txt(tmp_path / "train.txt", STORIES)
    message = error_of(tmp_path, f"--train_files={tmp_path / 'train.txt'}", "--val_fraction=0")
    assert message.startswith("the val split is empty") and "raise --val_fraction" in message
    message = error_of(tmp_path, f"--train_files={tmp_path / '*.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert message.startswith(f"{tmp_path / 'val.txt'} is in both --train_files and --val_files")
    assert "is a file: give local files with --train_files" in error_of(tmp_path, f"--dataset={tmp_path / 'train.txt'}")
    message = error_of(tmp_path, f"--dataset={tmp_path / 'no-such-folder'}")
    assert message.endswith("no such folder (a Hugging Face dataset is named owner/name, like roneneldan/TinyStories); "
                            "or give local files with --train_files")
    assert not (tmp_path / "out").exists()  # nor an empty folder for the output


def test_inputs_named_twice_are_read_once_and_a_copy_of_val_in_train_is_refused(tmp_path):
    write_official_txt(tmp_path / "train.txt", STORIES)
    os.mkdir(tmp_path / "v")
    write_official_txt(tmp_path / "v" / "val.txt", ["v"])
    val = tmp_path / "v" / "val.txt"
    run(tmp_path, f"--train_files={tmp_path / 'train.txt'},{tmp_path / '*.txt'},{tmp_path / 'train.txt'}",
        f"--val_files={val},{val}")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(TXT_STORIES))  # once, not three times
    assert np.array_equal(tokens(tmp_path / "out", "val"), gpt2_ids(["v"]))
    os.link(val, tmp_path / "v.txt")  # the same bytes under another name
    message = error_of(tmp_path, f"--train_files={tmp_path / 'v.txt'},{tmp_path / 'train.txt'}", f"--val_files={val}",
                       out="out2")
    assert message.startswith(f"{val} (--val_files) holds the same bytes as {tmp_path / 'v.txt'} (--train_files)")


def test_a_file_name_with_glob_characters_is_that_file(tmp_path):
    write_official_txt(tmp_path / "s[1].txt", STORIES)
    write_official_txt(tmp_path / "s1.txt", ["the wrong file"])
    write_official_txt(tmp_path / "val.txt", ["v"])
    run(tmp_path, f"--train_files={tmp_path / 's[1].txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(TXT_STORIES))


def test_a_second_prepare_into_a_folder_being_written_is_refused_and_touches_nothing(tmp_path):
    fcntl = pytest.importorskip("fcntl")
    write_official_txt(tmp_path / "train.txt", STORIES)
    write_official_txt(tmp_path / "val.txt", ["v"])
    flags = [f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}"]
    run(tmp_path, *flags)
    (tmp_path / "out" / "train.bin.tmp").write_bytes(b"the other run's work")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    other_run = os.open(tmp_path / "out", os.O_RDONLY)  # holds the folder's lock, as a running prepare.py does
    fcntl.flock(other_run, fcntl.LOCK_EX)
    try:
        message = error_of(tmp_path, *flags, "--force=True")
    finally:
        os.close(other_run)
    assert message.startswith(f"another run is writing --data_dir={tmp_path / 'out'}: wait for it")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    run(tmp_path, *flags, "--force=True")  # once it is done, the folder is free
    assert sorted(os.listdir(tmp_path / "out")) == ["meta.json", "train.bin", "val.bin"]


def test_column_text_that_is_not_utf8_is_a_one_line_error(tmp_path):
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "caf\xe9 story"}\n')  # Latin-1, not UTF-8
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / 'bad.jsonl'}", f"--val_files={tmp_path / 'val.txt'}")
    assert message.startswith(f"a story in {tmp_path / 'bad.jsonl'} is not UTF-8 text (")
    assert message.endswith(f"save it as UTF-8, for example from Windows-1252 with iconv -f CP1252 -t UTF-8 "
                            f"{tmp_path / 'bad.jsonl'} > {tmp_path / 'bad-utf8.jsonl'}")
    assert "(byte 0xe9 cannot start or continue a character)" in message


@pytest.mark.parametrize("encoding, name", [("utf-16-le", "UTF-16LE"), ("utf-16-be", "UTF-16BE"), ("utf-16", "UTF-16"),
                                            ("utf-32-le", "UTF-32LE"), ("utf-32-be", "UTF-32BE"), ("utf-32", "UTF-32")])
@pytest.mark.parametrize("file", ["train.txt", "train.jsonl"])
def test_utf16_and_utf32_text_is_refused_naming_the_file_and_the_conversion(tmp_path, encoding, name, file):
    # without a byte-order mark, UTF-16 decodes as UTF-8 without an error: one long story of NUL-riddled garbage
    text = "".join(json.dumps({"text": s}) + "\n" for s in STORIES) if file.endswith(".jsonl") else "\n\n".join(STORIES)
    (tmp_path / file).write_bytes(text.encode(encoding))
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / file}", f"--val_files={tmp_path / 'val.txt'}")
    stem, ext = os.path.splitext(tmp_path / file)
    assert message == (f"--train_files: {tmp_path / file} is {name} text, not UTF-8: save it as UTF-8, for example "
                       f"with iconv -f {name} -t UTF-8 {tmp_path / file} > {stem}-utf8{ext}")
    assert (tmp_path / file).read_bytes().decode(name) == text  # the named encoding is the file's (iconv's names)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("data", [bytes(4096), np.arange(1000, dtype=np.uint32).tobytes()], ids=["nuls", "ints"])
def test_a_binary_file_is_refused_as_binary_not_as_utf16(tmp_path, data):
    # NUL bytes alone would name it UTF-16 or UTF-32 text, with an iconv line that converts nothing useful
    (tmp_path / "train.txt").write_bytes(data)
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert message == (f"--train_files: {tmp_path / 'train.txt'} holds binary data, not text (control bytes such as "
                       "NUL throughout): pass UTF-8 text files")


def test_a_stray_nul_in_utf8_text_is_kept(tmp_path):
    stories = ["A story with a NUL \0 in it.", "And another one."]
    write_official_txt(tmp_path / "train.txt", stories)
    write_official_txt(tmp_path / "val.txt", ["v"])
    run(tmp_path, f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert np.array_equal(tokens(tmp_path / "out", "train"), gpt2_ids(stories))


def test_txt_in_another_8_bit_encoding_is_refused_naming_the_file(tmp_path):
    (tmp_path / "train.txt").write_bytes("A caf\u00e9 story \u201cquoted\u201d.\n".encode("cp1252"))
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    assert message == (f"{tmp_path / 'train.txt'} is not UTF-8 text (byte 0xe9 cannot start or continue a character): "
                       "save it as UTF-8, for example from Windows-1252 with iconv -f CP1252 -t UTF-8 "
                       f"{tmp_path / 'train.txt'} > {tmp_path / 'train-utf8.txt'}")
    assert not (tmp_path / "out" / "meta.json").exists()


def test_text_that_is_not_utf8_in_a_dataset_folder_is_refused(tmp_path):
    os.mkdir(tmp_path / "ds")
    (tmp_path / "ds" / "train.txt").write_bytes("\n\n".join(STORIES).encode("utf-16-le"))
    message = error_of(tmp_path, f"--dataset={tmp_path / 'ds'}")
    assert message.startswith(f"--dataset: {tmp_path / 'ds' / 'train.txt'} is UTF-16LE text, not UTF-8: save it")
    (tmp_path / "ds" / "train.txt").write_bytes("A caf\u00e9 story.\n".encode("cp1252"))
    message = error_of(tmp_path, f"--dataset={tmp_path / 'ds'}")
    assert message == (f"a file of --dataset={tmp_path / 'ds'} is not UTF-8 text (byte 0xe9 cannot start or continue a "
                       "character): save its files as UTF-8 (iconv converts them)")


@pytest.mark.parametrize("when", ["while writing", "before writing"])
def test_a_full_datasets_cache_says_where_it_is_and_names_cache_dir(tmp_path, monkeypatch, when):
    import datasets.arrow_writer
    import datasets.builder

    def disk_full(self, *args, **kwargs):  # datasets writing its Arrow copy of a local file into the cache
        raise OSError(28, "No space left on device")

    if when == "while writing":
        monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, "write_table", disk_full)
    else:  # datasets' own free-space check, which raises an OSError without an errno
        monkeypatch.setattr(datasets.builder, "has_sufficient_disk_space", lambda *args, **kwargs: False)
    write_official_txt(tmp_path / "train.txt", STORIES)
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}")
    why = "No space left on device" if when == "while writing" else "not enough disk space"
    assert message == (f"cannot write the datasets cache at {tmp_path / 'hf-cache'} while reading "
                       f"{tmp_path / 'train.txt'} ({why}): free some space there, or point --cache_dir=DIR at a disk "
                       "with room")


@pytest.mark.parametrize("raised", ["read-only", "no message", "ctrl-c"])
def test_what_goes_wrong_while_datasets_writes_its_cache(tmp_path, monkeypatch, raised):
    import datasets.arrow_writer

    def fails(self, *args, **kwargs):
        raise {"read-only": OSError(30, "Read-only file system", str(tmp_path / "hf-cache" / "x.arrow")),
               "no message": pa.ArrowInvalid(""), "ctrl-c": KeyboardInterrupt()}[raised]

    monkeypatch.setattr(datasets.arrow_writer.ArrowWriter, "write_table", fails)
    write_official_txt(tmp_path / "train.txt", STORIES)
    write_official_txt(tmp_path / "val.txt", ["v"])
    files = [f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}"]
    if raised == "ctrl-c":  # datasets wraps it in its own error: it must stay a Ctrl-C (exit 130, 'interrupted')
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, *files)
        return
    message = error_of(tmp_path, *files)
    assert message == {
        "read-only": f"cannot write the datasets cache at {tmp_path / 'hf-cache'} (Read-only file system: "
                     f"{tmp_path / 'hf-cache' / 'x.arrow'}): point --cache_dir=DIR at a folder you can write",
        "no message": f"datasets could not read {tmp_path / 'train.txt'} (ArrowInvalid); check that it is valid",
    }[raised]


def test_a_dataset_path_that_is_not_there_or_a_folder_for_train_files(tmp_path, monkeypatch):
    for name in ["./no-such-folder", str(tmp_path / "nope"), "data/a/b"]:
        assert error_of(tmp_path, f"--dataset={name}") == (
            f"--dataset={name}: no such folder (a Hugging Face dataset is named owner/name, like "
            "roneneldan/TinyStories); or give local files with --train_files")
    monkeypatch.setenv("HOME", str(tmp_path))  # ~ is expanded, as for the _dir flags
    os.mkdir(tmp_path / "ds")
    write_official_txt(tmp_path / "ds" / "train.txt", STORIES)
    write_official_txt(tmp_path / "ds" / "validation.txt", ["v"])
    assert run(tmp_path, "--dataset=~/ds")["source"]["dataset"] == str(tmp_path / "ds")
    assert error_of(tmp_path, f"--train_files={tmp_path / 'ds'}") == (
        f"--train_files: {tmp_path / 'ds'} is a folder: name its files ('{tmp_path / 'ds' / '*.txt'}'), or give the "
        "folder as --dataset")


def test_a_parquet_file_with_a_corrupt_footer_is_a_one_line_error(tmp_path):
    write_column_file(tmp_path / "train.parquet", STORIES)
    data = bytearray((tmp_path / "train.parquet").read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")  # ... footer, its length, b"PAR1"
    data[-8 - footer:-8] = b"\xab" * footer
    (tmp_path / "train.parquet").write_bytes(bytes(data))
    write_official_txt(tmp_path / "val.txt", ["v"])
    message = error_of(tmp_path, f"--train_files={tmp_path / 'train.parquet'}", f"--val_files={tmp_path / 'val.txt'}")
    assert message.startswith(f"datasets could not read {tmp_path / 'train.parquet'} (")
    assert message.endswith("); check that it is valid")


def test_outputs_never_become_inputs(tmp_path, capsys):
    os.mkdir(tmp_path / "data")
    write_column_file(tmp_path / "data" / "stories.jsonl", STORIES * 20)
    flags = [f"--train_files={tmp_path / 'data' / '*.json*'}", "--val_fraction=0.2", "--tokenizer=bpe:300"]
    run(tmp_path, *flags, out="data")  # the first run matches only the stories
    message = error_of(tmp_path, *flags, out="data")  # the second would read meta.json (and tokenizer.json) as stories
    assert message == (f"--train_files matches {tmp_path / 'data' / 'meta.json'}, which prepare.py writes into "
                       f"--data_dir={tmp_path / 'data'}: name the stories' files alone (for example 'dir/*.jsonl'), or "
                       "give the data a folder of its own")
    run(tmp_path, f"--train_files={tmp_path / 'data' / '*.jsonl'}", *flags[1:], out="data")
    assert "is up to date" in capsys.readouterr().out
    os.mkdir(tmp_path / "ds")
    write_official_txt(tmp_path / "ds" / "train.txt", STORIES)
    for out in ("ds", "ds/tokens"):  # every file of a dataset folder is its input: each run would rebuild
        message = error_of(tmp_path, f"--dataset={tmp_path / 'ds'}", out=out)
        assert message == (f"--data_dir={tmp_path / out} is inside --dataset={tmp_path / 'ds'}, so the output would "
                           "join the input and every run would rebuild: give the data a folder outside it")
    assert os.listdir(tmp_path / "ds") == ["train.txt"]
    os.symlink(tmp_path / "elsewhere", tmp_path / "ds" / "link")  # the output folder, reached through a link in it
    run(tmp_path, f"--train_files={tmp_path / 'ds' / 'train.txt'}", "--val_fraction=0.2", out="elsewhere")
    message = error_of(tmp_path, f"--dataset={tmp_path / 'ds'}", out="elsewhere")
    assert message.startswith(f"--data_dir={tmp_path / 'elsewhere'} is inside --dataset={tmp_path / 'ds'}, so the")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", ".csv"])
def test_a_text_file_given_as_a_config_file_points_at_train_files(tmp_path, suffix):
    write_official_txt(tmp_path / f"stories{suffix}", STORIES)  # (only the name matters)
    with pytest.raises(UserError, match=rf"stories{suffix} is not a config file \(positional arguments are config "
                                        rf"files; .*\); to prepare it, give --train_files=.*stories{suffix}$"):
        prepare.main([str(tmp_path / f"stories{suffix}")])


def test_a_tokenizer_that_cannot_be_saved_is_an_os_error(tmp_path):
    with pytest.raises(OSError, match="writing .*tokenizer.json"):  # main() turns OSErrors into one line
        prepare.train_bpe(300, iter([STORIES]), str(tmp_path / "missing-folder" / "tokenizer.json"))


def test_errors_for_settings_output_and_hub(tmp_path):
    assert "unknown --tokenizer=bpe:100" in error_of(tmp_path, "--tokenizer=bpe:100")
    assert "to 1,000,000" in error_of(tmp_path, "--tokenizer=bpe:99999999999999999999")  # (the trainer: overflow)
    assert "--chunk_mb must be at most 100,000" in error_of(tmp_path, "--chunk_mb=1e308")
    message = error_of(tmp_path, "--tokenizer=bpe:70000", "--dtype=uint16")
    assert message == ("a vocabulary of 70,000 tokens is too big for --dtype=uint16 (ids up to 65,535): use "
                       "--dtype=uint32 or auto")
    (tmp_path / "a-file").write_text("")
    message = error_of(tmp_path, f"--data_dir={tmp_path / 'a-file' / 'data'}")
    assert message.startswith(f"cannot write to --data_dir={tmp_path / 'a-file' / 'data'} (Not a directory)")
    if os.geteuid() != 0:  # root may write anywhere
        (tmp_path / "read-only").mkdir(mode=0o555)
        assert "(Permission denied)" in error_of(tmp_path, f"--data_dir={tmp_path / 'read-only'}")
    # conftest sets HF_HUB_OFFLINE=1: datasets raises ConnectionError at once, as it does (after retries) offline
    message = error_of(tmp_path, "--dataset=roneneldan/TinyStories", out="data/tinystories")
    assert message.startswith("cannot reach the Hugging Face hub to load roneneldan/TinyStories")
    assert "--train_files=TinyStories-train.txt --val_files=TinyStories-valid.txt" in message
    assert "TIKTOKEN_CACHE_DIR" in message
    assert not (tmp_path / "data").exists()  # the folders it made for the output are gone with the run
    (tmp_path / "one.txt").write_text("A story.\n")
    assert error_of(tmp_path, f"--train_files={tmp_path / 'one.txt'}", "--val_fraction=0", "--tokenizer=bpe:300",
                    out="data/empty").startswith("the val split is empty")
    assert not (tmp_path / "data").exists()


def test_offline_without_hf_hub_offline_fails_at_once(tmp_path, monkeypatch):
    # a user without a network and without HF_HUB_OFFLINE: datasets would retry for ~25 s (and log each retry)
    import socket

    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # (conftest sets it; restored after the test)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for proxy in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    looked_up = []

    def no_dns(host, *args, **kwargs):
        looked_up.append(host)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    message = error_of(tmp_path, "--dataset=roneneldan/TinyStories")
    assert message.startswith("cannot reach the Hugging Face hub to load roneneldan/TinyStories (huggingface.co "
                              "does not resolve). Offline, give local files: --train_files=")
    assert looked_up[0] == "huggingface.co"


def test_error_from_the_command_line_is_one_line_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "prepare.py", f"--train_files={tmp_path / 'nope.txt'}",
                             f"--data_dir={tmp_path / 'out'}"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"prepare.py: error: --train_files: no file matches '{tmp_path / 'nope.txt'}'; check the path (globs like "
        "'dir/*.txt' work)"]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_help_lists_every_setting():
    result = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    for name in ("dataset", "train_files", "val_fraction", "tokenizer", "data_dir", "force", "num_workers"):
        assert f"--{name}=" in result.stdout
    for field in dataclasses.fields(prepare.PrepareConfig):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(f"--{field.name}="))
        assert len(line.split(None, 1)[1]) > 5, line  # a description follows the default
    assert "bpe:N" in result.stdout
