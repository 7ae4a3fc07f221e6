"""
Turn TinyStories (or any text) into the flat token streams that train.py samples from.

    python prepare.py                                   # Hugging Face roneneldan/TinyStories, GPT-2 BPE
    python prepare.py --tokenizer=bpe:4096              # train a small byte-level BPE instead
    python prepare.py --train_files='TinyStories-train.txt' --val_files='TinyStories-valid.txt'

Writes data_dir/train.bin, val.bin (np.uint16 or np.uint32 token ids, the end-of-text token after every story) and
meta.json (tokenizer, vocabulary, counts, source, settings). The tokenizer lives here, with the data it made:
train.py, sample.py and export.py load it through load_tokenizer.
"""

import codecs
import dataclasses
import errno
import glob
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
import unicodedata

from cli import UserError, first_line, lock_folder, parse_config, run_main

# -----------------------------------------------------------------------------
# tokenizers

EOT_TEXT = "<|endoftext|>"


class Tokenizer:
    """
    The two tokenizers slm knows, behind one encode/decode:
      'gpt2'   tiktoken's GPT-2 BPE (50,257 tokens, end-of-text 50256);
      'bpe:N'  a byte-level BPE of N tokens trained by prepare.py and saved as tokenizer.json.
    encode() never turns special-token text inside a story into a special token: the end-of-text token only ever
    comes from prepare.py appending it. tiktoken_encoding is tiktoken's Encoding for 'gpt2' (export.py reads it), else
    None. sha256 identifies the tokenizer by its content, not its name (two bpe:512 tokenizers trained on different
    text share a name): of tokenizer.json's bytes, or of tiktoken's GPT-2 token bytes in id order.
    """

    def __init__(self, name, tokenizer_file=None):
        self.name = name
        if name == "gpt2":
            self.tiktoken_encoding = _load_tiktoken_gpt2()
            self.eot_token = self.tiktoken_encoding.eot_token
            self.vocab_size = self.tiktoken_encoding.n_vocab
            digest = hashlib.sha256()
            for i in range(self.vocab_size):  # each token's length, then its bytes: no two vocabularies hash alike
                token = self.tiktoken_encoding.decode_single_token_bytes(i)
                digest.update(len(token).to_bytes(4, "little") + token)
            self.sha256 = digest.hexdigest()
        elif name.startswith("bpe:"):
            from tokenizers import Tokenizer as HFTokenizer

            if not tokenizer_file or not os.path.exists(tokenizer_file):
                raise UserError(f"tokenizer {name} needs its tokenizer.json, not found at {tokenizer_file}; "
                                "re-run prepare.py to make it")
            self.tiktoken_encoding = None
            self.sha256 = file_sha256(tokenizer_file)
            try:
                self._hf = HFTokenizer.from_file(tokenizer_file)
            except Exception as e:  # not JSON, or not a tokenizers file: tokenizers raises a bare Exception
                raise UserError(f"{tokenizer_file} is not a readable tokenizer.json ({first_line(e)[:100]})"
                                "; put back the tokenizer.json prepare.py wrote") from None
            self._hf.encode_special_tokens = True  # literal '<|endoftext|>' text stays text (not saved in the file)
            self.eot_token = self._hf.token_to_id(EOT_TEXT)
            self.vocab_size = self._hf.get_vocab_size()
        else:
            raise UserError(f"unknown tokenizer {name!r}: use gpt2 or bpe:N (for example bpe:4096)")

    def encode(self, text):
        if self.tiktoken_encoding is not None:
            return self.tiktoken_encoding.encode_ordinary(text)
        return self._hf.encode(text).ids

    def decode(self, ids):
        if self.tiktoken_encoding is not None:
            return self.tiktoken_encoding.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)

    def encode_stories(self, stories):
        """Each story's ids followed by the end-of-text token, in one flat np.uint32 array: what prepare.py writes."""
        import numpy as np

        if self.tiktoken_encoding is not None:
            # One call on the stories joined by the end-of-text text gives the same ids as one call per story (tiktoken
            # splits at special tokens before anything else), about 30% faster, and straight into numpy. The joined text
            # holds one end-of-text per story unless a story contains that text itself: then each story goes alone, as
            # ordinary text.
            text = EOT_TEXT.join(stories) + EOT_TEXT
            if text.count(EOT_TEXT) == len(stories):
                return self.tiktoken_encoding.encode_to_numpy(text, allowed_special={EOT_TEXT})
            ids = [self.tiktoken_encoding.encode_ordinary(s) + [self.eot_token] for s in stories]
        else:
            ids = [e.ids + [self.eot_token] for e in self._hf.encode_batch_fast(stories)]
        return np.fromiter(itertools.chain.from_iterable(ids), np.uint32)


def load_tokenizer(meta, data_dir):
    """
    The Tokenizer that made a dataset, from its meta.json and the folder that holds it (a data folder, or a run's
    out_dir, where train.py copies tokenizer.json), checked against the content hash (tokenizer_sha256; meta.json
    from before it was recorded has none), the vocabulary size and the end-of-text id in meta.
    """
    tokenizer_file = meta.get("tokenizer_file")
    path = tokenizer_file and os.path.join(data_dir, tokenizer_file)
    run = os.path.exists(os.path.join(data_dir, "ckpt.pt"))  # a training run's folder, not a data folder
    if path and not os.path.isfile(path):
        fix = (f"copy {tokenizer_file} from the data folder this run was trained on into {data_dir}" if run else
               "re-run prepare.py to make it")
        raise UserError(f"tokenizer {meta['tokenizer']} needs its {tokenizer_file}, not found at {path}: {fix}")
    tokenizer = Tokenizer(meta["tokenizer"], path)
    if meta.get("tokenizer_sha256") not in (None, tokenizer.sha256):
        what = path or "tiktoken's GPT-2 files (TIKTOKEN_CACHE_DIR)"
        fix = (f"copy the {tokenizer_file} of the data folder this run was trained on into {data_dir}" if path and run
               else f"put back the {tokenizer_file} prepare.py wrote, or re-run prepare.py" if path
               else "delete the tiktoken cache so that it downloads the files again")
        raise UserError(f"{what} is not the tokenizer the {'checkpoint' if run else 'data'} was made with (its "
                        f"sha256 differs from meta's tokenizer_sha256): {fix}")
    made_with = (meta.get("vocab_size"), meta.get("eot_token"))
    if None not in made_with and made_with != (tokenizer.vocab_size, tokenizer.eot_token):
        raise UserError(f"the tokenizer in {data_dir} ({tokenizer.vocab_size} tokens, end of text "
                        f"{tokenizer.eot_token}) is not the one the data was made with ({made_with[0]} tokens, end "
                        f"of text {made_with[1]}): put back that run's {tokenizer_file}, or re-run prepare.py")
    return tokenizer


def file_sha256(path):
    """The sha256 of a file's bytes, read in 1 MB blocks (about 0.5-1 GB/s)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _load_tiktoken_gpt2():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no cache: requests' ConnectionError, or similar
        raise UserError(
            f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}). It downloads them on first use; "
            "offline, set TIKTOKEN_CACHE_DIR to a folder that holds them (prepare.py could use --tokenizer=bpe:N "
            "instead)") from None


# -----------------------------------------------------------------------------
# prepare: a corpus -> data_dir/train.bin, val.bin, meta.json (and tokenizer.json for bpe:N)
#
# What counts as a story, exactly (the token streams are encode(story) + [end-of-text] for each one, in order):
#   hub datasets, .parquet, .json, .jsonl  one row of --text_column, unchanged (rows of only whitespace are skipped);
#   .txt with lines that are exactly <|endoftext|> (the official TinyStories files)  the text between those lines;
#   any other .txt  the text between blank lines (a blank line holds nothing but spaces or tabs).
# In .txt files, the line breaks at the start and end of a story belong to the separator and are dropped; everything
# else is kept. .txt files are read as text, so Windows '\r\n' line ends become '\n' (the same tokens as the file
# saved with '\n'), and a byte-order mark at the start (as Notepad writes) is dropped; the columnar formats keep every
# character as stored. Literal '<|endoftext|>' text stays text. A --dataset of .txt files reads them the same way.
# Text is UTF-8: .txt/.json/.jsonl files in UTF-16 or UTF-32 are refused before datasets reads them (check_utf8),
# and other encodings fail as datasets decodes them (source_error).


@dataclasses.dataclass
class PrepareConfig:
    dataset: str = "roneneldan/TinyStories"  # Hugging Face dataset (hub name or local folder) with a train split
    text_column: str = "text"  # the column that holds one story per row (hub, .parquet, .json, .jsonl)
    train_files: str = ""  # read these local files instead of --dataset: paths or globs, comma-separated
    val_files: str = ""  # local validation files; when empty, val_fraction of the training stories is held out
    val_fraction: float = 0.005  # share of training stories held out when the source has no validation split
    seed: int = 1337  # which stories are held out
    tokenizer: str = "gpt2"  # gpt2 (tiktoken's GPT-2 BPE) or bpe:N (train a byte-level BPE of N tokens here)
    dtype: str = "auto"  # token file dtype: auto (uint16 when the vocabulary fits, else uint32), uint16 or uint32
    data_dir: str = "data/tinystories"  # where train.bin, val.bin, meta.json (and tokenizer.json) are written
    force: bool = False  # rebuild, reading every input afresh, even when data_dir holds these settings' output
    num_workers: int = 0  # encoding threads (0 = all cores)
    chunk_mb: float = 4.0  # MB of text a worker encodes at once: memory grows with chunk_mb x workers, not the corpus
    cache_dir: str = ""  # where datasets keeps its Arrow copy of the source (empty = its default cache)
    fix_mojibake: bool = True  # repair the Hub release's mis-encoded punctuation (â€œ â€™ â€ back to “ ’ ”)


MIN_CHUNK_MB = 0.0001  # 100 bytes: the tests split tiny corpora into many chunks; below that is a mistake
MAX_CHUNK_MB = 100_000  # 100 GB of text per worker at once: above that is a mistake
VERSION = 2  # bump when a change here changes the output for the same settings, so old outputs get rebuilt
BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TXT_OPTIONS = dict(keep_linebreaks=True, encoding="utf-8-sig")  # rows of lines that read_stories puts together
VAL_SPLITS = ("validation", "valid", "val")
EOT_LINE = re.compile(r"^<\|endoftext\|>$\n?", re.MULTILINE)  # official TinyStories .txt: a line holding just that
BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")  # any other .txt: one or more blank lines
# The Hugging Face parquet release of TinyStories holds UTF-8 punctuation (U+2000-U+203F: bytes E2 80 xx) that was
# decoded as Windows-1252 and encoded again: “ became â€œ, ’ became â€™. ” ends in byte 0x9D, which Windows-1252
# lacks, so a bare â€ is left of it. Each byte 0x80-0xBF as Windows-1252 shows it (or as the C1 control it lacks):
CP1252_BYTE = {bytes([b]).decode("cp1252", errors="ignore") or chr(b): b for b in range(0x80, 0xC0)}
MOJIBAKE_RE = re.compile("â€([" + re.escape("".join(CP1252_BYTE)) + "]?)")


def fix_mojibake(story):
    if "â€" not in story:
        return story
    return MOJIBAKE_RE.sub(lambda m: bytes([0xE2, 0x80, CP1252_BYTE[m[1]]]).decode() if m[1] else "”", story)


def main(argv=None):
    cfg = parse_config(PrepareConfig, argv, __doc__)
    vocab_size, dtype = check_tokenizer(cfg)
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val_fraction must be at least 0 and below 1, got {cfg.val_fraction}")
    if cfg.val_files and not cfg.train_files:
        raise UserError("--val_files needs --train_files too (or leave both empty to use --dataset)")
    if cfg.num_workers < 0:
        raise UserError(f"--num_workers must be 0 (all cores) or more, got {cfg.num_workers}")
    if cfg.chunk_mb < MIN_CHUNK_MB:
        raise UserError(f"--chunk_mb must be at least {MIN_CHUNK_MB:g} (100 bytes), got {cfg.chunk_mb:g}; the "
                        "default 4 suits most machines")
    if cfg.chunk_mb > MAX_CHUNK_MB:
        raise UserError(f"--chunk_mb must be at most {MAX_CHUNK_MB:,} (100 GB), got {cfg.chunk_mb:g}; the default 4 "
                        "suits most machines")
    train_files, val_files = find_files(cfg.train_files, "train_files"), find_files(cfg.val_files, "val_files")
    both = sorted({os.path.realpath(f) for f in train_files} & {os.path.realpath(f) for f in val_files})
    if both:
        raise UserError(f"{both[0]} is in both --train_files and --val_files, so the model would be evaluated on "
                        "stories it trained on: give each split its own files")
    if not train_files:
        cfg.dataset = os.path.expanduser(cfg.dataset)  # (the shell leaves ~ alone after --dataset=)
        if os.path.isfile(cfg.dataset):
            raise UserError(f"--dataset={cfg.dataset} is a file: give local files with --train_files (and "
                            "--val_files)")
        path_like = os.path.isabs(cfg.dataset) or cfg.dataset.startswith((".", "~")) or cfg.dataset.count("/") > 1
        if path_like and not os.path.isdir(cfg.dataset):  # (a hub name has one /: owner/name)
            raise UserError(f"--dataset={cfg.dataset}: no such folder (a Hugging Face dataset is named owner/name, "
                            "like roneneldan/TinyStories); or give local files with --train_files")
    outputs = {os.path.realpath(os.path.join(cfg.data_dir, name)) for name in ("meta.json", "tokenizer.json")}
    for flag, f in [("train_files", f) for f in train_files] + [("val_files", f) for f in val_files]:
        if os.path.realpath(f) in outputs:  # ('data/*.json*' with --data_dir=data: a re-run would read its meta.json)
            raise UserError(f"--{flag} matches {f}, which prepare.py writes into --data_dir={cfg.data_dir}: name the "
                            "stories' files alone (for example 'dir/*.jsonl'), or give the data a folder of its own")
    # Everything that decides the output, inputs included (local files by size, modification time and the sha256 of
    # their bytes, which catches a file replaced by one of the same size and time, as `cp -p` and rsync leave it),
    # so a re-run can tell that data_dir already holds exactly this without tokenizing the corpus.
    local_dataset = not train_files and os.path.isdir(cfg.dataset)
    settings = dict(version=VERSION, tokenizer=cfg.tokenizer, dtype=dtype, text_column=cfg.text_column,
                    val_fraction=cfg.val_fraction, seed=cfg.seed, fix_mojibake=cfg.fix_mojibake,
                    dataset=None if train_files else cfg.dataset,
                    train_files=fingerprint(train_files), val_files=fingerprint(val_files))
    train_bytes = {f["sha256"]: f["path"] for f in settings["train_files"] if f["bytes"]}
    copies = [(f["path"], train_bytes[f["sha256"]]) for f in settings["val_files"] if f["sha256"] in train_bytes]
    if copies:  # (a hard link or a copy: realpath does not see it)
        raise UserError(f"{copies[0][0]} (--val_files) holds the same bytes as {copies[0][1]} (--train_files), so the "
                        "model would be evaluated on stories it trained on: give each split its own files")
    if local_dataset:  # a dataset folder on disk: its files are inputs too
        folder, out_folder = os.path.realpath(cfg.dataset), os.path.realpath(cfg.data_dir)
        dataset_files = sorted(
            f for f in glob.glob(os.path.join(glob.escape(cfg.dataset), "**"), recursive=True) if os.path.isfile(f))
        if os.path.commonpath([folder, out_folder]) == folder or any(  # (or a link in it leads there)
                os.path.commonpath([os.path.realpath(f), out_folder]) == out_folder for f in dataset_files):
            raise UserError(f"--data_dir={cfg.data_dir} is inside --dataset={cfg.dataset}, so the output would join "
                            "the input and every run would rebuild: give the data a folder outside it")
        for f in dataset_files:
            check_utf8(f, "--dataset")
        settings["dataset_files"] = fingerprint(dataset_files)
    meta = None if cfg.force else read_meta_if_complete(cfg.data_dir, settings)
    if meta:
        print(f"{cfg.data_dir} is up to date ({meta['train']['tokens']:,} train and {meta['val']['tokens']:,} val "
              "tokens); --force=True rebuilds it")
        return meta

    if os.path.exists(os.path.join(cfg.data_dir, "ckpt.pt")):  # it would replace (or remove) the run's tokenizer.json
        raise UserError(f"--data_dir={cfg.data_dir} holds a training run (ckpt.pt): give the data a folder of its own")
    if os.path.exists(os.path.join(cfg.data_dir, "tokenizer.json")) and not any(
            os.path.exists(os.path.join(cfg.data_dir, name)) for name in ("meta.json", "train.bin")):
        raise UserError(f"--data_dir={cfg.data_dir} holds a tokenizer.json that prepare.py did not write (an export?), "
                        "which it would replace or remove: give the data a folder of its own")
    out = {name: os.path.join(cfg.data_dir, name) for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json")}
    tmp = {name: path + ".tmp" for name, path in out.items()}
    created = new_folders(cfg.data_dir)  # (removed again unless the data is written into them)
    try:  # find out now, not after an hour of work
        os.makedirs(cfg.data_dir, exist_ok=True)
        probe = os.path.join(cfg.data_dir, f".write-test-{os.getpid()}")  # (not a name another run may be using)
        open(probe, "wb").close()
        remove(probe)
        remove_empty(created)  # made again once the stories load: an offline hub leaves no empty folder
    except OSError as e:
        remove_empty(created)
        raise UserError(f"cannot write to --data_dir={cfg.data_dir} ({e.strerror}); choose a folder you can write to"
                        ) from None
    tokenizer = Tokenizer("gpt2") if cfg.tokenizer == "gpt2" else None  # fails fast when tiktoken is offline
    sha256 = {f["path"]: f["sha256"] for f in settings["train_files"] + settings["val_files"]}
    train, val, source = load_sources(cfg, train_files, val_files, sha256, local_dataset)
    os.makedirs(cfg.data_dir, exist_ok=True)
    # one prepare.py at a time per data_dir, from here until the files are in place (or removed): two would swap their
    # files in over each other's and could leave one run's meta.json beside the other's .bin files
    lock = lock_folder(cfg.data_dir, f"another run is writing --data_dir={cfg.data_dir}: wait for it to finish (a "
                                     "re-run then finds it up to date), or give this one another --data_dir")
    try:
        if tokenizer is None:
            no_val = None if val is None else []  # the training stories only: the same ones held out, no val source
            with progress_bar(train, "training BPE") as bar:
                train_bpe(vocab_size, (t for t, _ in story_chunks(train, no_val, cfg, bar)), tmp["tokenizer.json"])
            tokenizer = Tokenizer(cfg.tokenizer, tmp["tokenizer.json"])
        with progress_bar(train + (val or []), "tokenizing") as bar:
            counts = write_tokens(story_chunks(train, val, cfg, bar), tokenizer, dtype, tmp["train.bin"],
                                  tmp["val.bin"], cfg.num_workers or len(os.sched_getaffinity(0)), bar)
        for split, c in counts.items():
            if split == "train" and c["stories"] == 0 and val is None and counts["val"]["stories"]:
                raise UserError(f"every story of {source['train']} was held out for val: lower --val_fraction="
                                f"{cfg.val_fraction:g}, or give validation files with --val_files")
            if c["stories"] == 0:
                held_out = split == "val" and val is None
                raise UserError(f"the {split} split is empty (no stories in {source[split]}); give it files with "
                                f"--{split}_files" + (" or raise --val_fraction" if held_out else ""))
        bpe = tokenizer.name != "gpt2"
        meta = {"tokenizer": tokenizer.name, "tokenizer_file": "tokenizer.json" if bpe else None,
                "tokenizer_sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size, "eot_token": tokenizer.eot_token, "dtype": dtype,
                "train": {"file": "train.bin", **counts["train"]}, "val": {"file": "val.bin", **counts["val"]},
                "source": source, "settings": settings}
        # Swap the new files in. The old meta.json goes first, so no moment leaves a meta.json beside files it does
        # not describe, and the new one comes last: a data_dir without meta.json is never trusted.
        remove(out["meta.json"])
        for name in ("train.bin", "val.bin") + (("tokenizer.json",) if bpe else ()):
            os.replace(tmp[name], out[name])
        if not bpe:
            remove(out["tokenizer.json"])  # left by an earlier bpe run
        with open(tmp["meta.json"], "w") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp["meta.json"], out["meta.json"])
    except OSError as e:  # disk full, a file that went away, ...
        raise UserError(f"preparing {cfg.data_dir} failed ({e}); check the free space and permissions") from None
    finally:
        for path in tmp.values():
            remove(path)
        if lock is not None:
            os.close(lock)
        remove_empty(created)  # a failed or interrupted first run leaves no empty folder
    for split in ("train", "val"):
        c = meta[split]
        print(f"{split}: {c['stories']:,} stories, {c['tokens']:,} tokens ({c['bytes'] / c['tokens']:.2f} bytes/token)"
              f" -> {out[split + '.bin']}")
    return meta


def new_folders(folder):
    """The folders that os.makedirs(folder) would create, innermost first."""
    missing = []
    while folder and not os.path.exists(folder):
        missing.append(folder)
        folder = os.path.dirname(folder.rstrip(os.sep))
    return missing


def remove_empty(folders):
    for folder in folders:
        try:
            os.rmdir(folder)  # (only an empty one)
        except OSError:
            return


def check_tokenizer(cfg):
    """The vocabulary size the tokenizer will have and the dtype that holds it, checked before any work is done."""
    if cfg.tokenizer == "gpt2":
        vocab_size = 50257
    elif re.fullmatch(r"bpe:\d+", cfg.tokenizer) and 257 <= int(cfg.tokenizer[4:]) <= 1_000_000:
        vocab_size = int(cfg.tokenizer[4:])
    else:
        raise UserError(f"unknown --tokenizer={cfg.tokenizer}: use gpt2 or bpe:N with N from 257 (256 bytes + "
                        "end-of-text) to 1,000,000, for example bpe:4096")
    fits16 = vocab_size <= 65536  # ids 0 to 65,535
    if cfg.dtype not in ("auto", "uint16", "uint32"):
        raise UserError(f"unknown --dtype={cfg.dtype}: use auto, uint16 or uint32")
    if cfg.dtype == "uint16" and not fits16:
        raise UserError(f"a vocabulary of {vocab_size:,} tokens is too big for --dtype=uint16 (ids up to 65,535): "
                        "use --dtype=uint32 or auto")
    return vocab_size, "uint16" if cfg.dtype == "auto" and fits16 else cfg.dtype.replace("auto", "uint32")


def find_files(patterns, flag):
    files = []
    for pattern in filter(None, (p.strip() for p in patterns.split(","))):
        pattern = os.path.expanduser(pattern)
        if os.path.isfile(pattern):  # a file whose name has glob characters ('s[1].txt') is that file
            found = [pattern]
        else:
            found = sorted(f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f))
        if not found and os.path.isdir(pattern):
            raise UserError(f"--{flag}: {pattern} is a folder: name its files ('{os.path.join(pattern, '*.txt')}'), "
                            "or give the folder as --dataset")
        if not found:
            raise UserError(f"--{flag}: no file matches {pattern!r}; check the path (globs like 'dir/*.txt' work)")
        for f in found:
            if os.path.splitext(f)[1].lower() not in BUILDERS:
                raise UserError(f"--{flag}: cannot read {f}: use .txt, .parquet, .json or .jsonl files")
            check_utf8(f, f"--{flag}")
        files += found
    first = {}  # a file named twice (or matched by two globs) is read once
    for f in files:
        first.setdefault(os.path.realpath(f), f)
    return list(first.values())


def check_utf8(path, flag):
    """Refuse a text file (.txt, .json, .jsonl) saved as UTF-16 or UTF-32: without a byte-order mark its NUL bytes
    are valid UTF-8, and it would be read as one long story of garbage; so would a binary file full of NULs, which is
    refused as binary rather than with a conversion that could not help. Text in other 8-bit encodings fails later,
    when datasets decodes it, and gets its own error (source_error)."""
    if BUILDERS.get(os.path.splitext(path)[1].lower()) not in ("text", "json"):
        return
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path} ({e.strerror})") from None
    if encoding := wide_encoding(head):
        unit = 4 if "32" in encoding else 2  # a sample cut inside a character decodes all but that character
        sample = head[:len(head) - len(head) % unit].decode(encoding, errors="replace")
        not_text = sum(c == "\ufffd" or unicodedata.category(c) == "Cc" and c not in "\t\n\r" for c in sample)
        if not_text > len(sample) / 100:
            # text has hardly any control characters or undecodable bytes; a binary file (NULs, numbers) has many
            raise UserError(f"{flag}: {path} holds binary data, not text (control bytes such as NUL throughout): "
                            "pass UTF-8 text files")
        raise UserError(f"{flag}: {path} is {encoding} text, not UTF-8: save it as UTF-8, for example with "
                        f"iconv -f {encoding} -t UTF-8 {path} > {utf8_name(path)}")


def wide_encoding(head):
    """'UTF-16', 'UTF-16LE', 'UTF-32'... when the first bytes of a file look like that encoding, else None. A stray
    NUL byte in UTF-8 text is not enough: in UTF-16 or UTF-32 text NULs are a large share of the bytes (every other
    byte of English text), and where they sit tells the byte order when no byte-order mark does."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):  # (before UTF-16's: FF FE starts both)
        return "UTF-32"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "UTF-16"
    nuls = head.count(0)
    if nuls == 0 or nuls < len(head) / 8:
        return None
    if nuls > len(head) / 2:  # three bytes of four in English UTF-32
        return "UTF-32BE" if head[0] == 0 else "UTF-32LE"
    return "UTF-16LE" if head[1::2].count(0) > head[0::2].count(0) else "UTF-16BE"


def not_utf8(subject, error, path=None):
    """The one-line error for text that is not UTF-8, with the iconv command that converts path."""
    bad = error.object[error.start:error.start + 1].hex()
    fix = (f"save it as UTF-8, for example from Windows-1252 with iconv -f CP1252 -t UTF-8 {path} > "
           f"{utf8_name(path)}" if path else "save its files as UTF-8 (iconv converts them)")
    return UserError(f"{subject} is not UTF-8 text (byte 0x{bad} cannot start or continue a character): {fix}")


def utf8_name(path):
    stem, ext = os.path.splitext(path)
    return f"{stem}-utf8{ext}"


def fingerprint(files):
    return [{"path": os.path.abspath(f), "bytes": (st := os.stat(f)).st_size, "mtime_ns": st.st_mtime_ns,
             "sha256": file_sha256(f)} for f in files]


def read_meta_if_complete(data_dir, settings):
    """meta.json if it was written with these settings and its files are all there at the right size, else None."""
    try:
        with open(os.path.join(data_dir, "meta.json")) as f:
            meta = json.load(f)
        itemsize = {"uint16": 2, "uint32": 4}[meta["dtype"]]
        complete = meta["settings"] == settings and all(
            os.path.getsize(os.path.join(data_dir, meta[s]["file"])) == meta[s]["tokens"] * itemsize
            for s in ("train", "val"))
        if meta["tokenizer_file"]:
            path = os.path.join(data_dir, meta["tokenizer_file"])
            complete = complete and file_sha256(path) == meta.get("tokenizer_sha256")
        return meta if complete else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def load_sources(cfg, train_files, val_files, sha256, local_dataset):
    """
    The train and val sources, as lists of (Arrow files, rows, text column, is .txt, name), all through datasets: its
    builder for a hub dataset by name, or for local files one at a time (so a story never runs on from one .txt file
    into the next), downloads or parses them once into Arrow files in its cache. (load_dataset would then memory-map
    them: the pages that touches count as resident memory, which then grows with the corpus. read_stories reads them
    as a stream instead.) val is None when the source has no validation split: then val_fraction of the training
    stories is held out. Also returns a description of the source for meta.json.
    datasets keys its cache of a local file by path, size and modification time, so a file replaced by another of the
    same size and time would be served from the cache: each local file's cache entry is named by the sha256 of its
    bytes (sha256: absolute path -> hash). --force parses local inputs afresh, and so does every rebuild of a dataset
    folder on disk (local_dataset), whose files have no such name.
    """
    import datasets
    import datasets.data_files
    import huggingface_hub.constants
    import pyarrow as pa
    from datasets.naming import filenames_for_dataset_split

    def prepare_splits(path, what, column, **options):
        try:
            builder = datasets.load_dataset_builder(path, cache_dir=cfg.cache_dir or None, **options)
            if builder.name == "text" and not builder.config.keep_linebreaks:  # .txt, local or a dataset's: a row
                return prepare_splits(path, what, column, **options, **TXT_OPTIONS)  # per line; read_stories joins
            if hasattr(builder.config, "fragment_scan_options"):
                # parquet: Arrow's pre-buffering kept read buffers alive, and memory grew with the file (+170 MB at
                # 500 MB)
                from pyarrow.dataset import ParquetFragmentScanOptions

                builder.config.fragment_scan_options = ParquetFragmentScanOptions(pre_buffer=False)
            builder.download_and_prepare(download_mode="force_redownload" if cfg.force or local_dataset else None)
        except (datasets.exceptions.DatasetGenerationError, pa.ArrowException, OSError) as e:
            if isinstance(e.__cause__, KeyboardInterrupt):  # datasets wraps a Ctrl-C in its own error
                raise KeyboardInterrupt from None
            if (error := source_error(e, what, cfg.cache_dir)) is None:
                raise  # (not found, offline: the clauses below)
            raise error from None
        if column not in builder.info.features:
            raise UserError(f"{what} has no column {column!r} (it has {', '.join(builder.info.features)}); "
                            "name the story column with --text_column=NAME")
        feature = builder.info.features[column]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise UserError(f"column {column!r} of {what} holds {feature}, not text: name the column that holds the "
                            "stories with --text_column=NAME")
        splits = {}
        for split, info in builder.info.splits.items():
            files = filenames_for_dataset_split(builder.cache_dir, builder.dataset_name, split, "arrow",
                                                info.shard_lengths)
            splits[split] = (files, info.num_examples, column, builder.name == "text", what)
        return splits

    def prepare_file(path):
        builder = BUILDERS[os.path.splitext(path)[1].lower()]
        content = "sha256-" + sha256[os.path.abspath(path)]  # the cache entry of exactly these bytes
        column = "text" if builder == "text" else cfg.text_column  # (the text builder's one column)
        # escaped: datasets expands data_files as globs, and 's[1].txt' would read s1.txt
        return prepare_splits(builder, path, column, name=content, data_files=[glob.escape(path)])["train"]

    offline = None  # the hub's host name, when it does not resolve
    try:
        if train_files:
            # (datasets cannot read an empty file: leave it out, and a split of only empty files is empty)
            train = [prepare_file(f) for f in train_files if os.path.getsize(f)]
            val = [prepare_file(f) for f in val_files if os.path.getsize(f)] if val_files else None
            source = {"train": ", ".join(train_files), "val": ", ".join(val_files)}
        else:
            if not local_dataset and (offline := unresolved_hub_host()):  # datasets would retry for ~25 s, then
                datasets.config.HF_HUB_OFFLINE = True  # fail: offline mode loads a copy cached earlier, or fails now
                huggingface_hub.constants.HF_HUB_OFFLINE = True
            splits = prepare_splits(cfg.dataset, cfg.dataset, cfg.text_column)
            if "train" not in splits:
                raise UserError(f"dataset {cfg.dataset} has no 'train' split (it has {', '.join(splits)}); "
                                "use another --dataset or --train_files")
            val_name = next((s for s in VAL_SPLITS if s in splits), None)
            train, val = [splits["train"]], [splits[val_name]] if val_name else None
            source = {"dataset": cfg.dataset, "train": "split train", "val": val_name and f"split {val_name}"}
    except ConnectionError as e:  # offline (HF_HUB_OFFLINE=1, or after datasets' retries), or the hub is down
        raise UserError(
            f"cannot reach the Hugging Face hub to load {cfg.dataset} "
            f"({f'{offline} does not resolve' if offline else first_line(e)}). Offline, give local "
            "files: --train_files=TinyStories-train.txt --val_files=TinyStories-valid.txt; tiktoken's gpt2 also needs "
            "its files cached (set TIKTOKEN_CACHE_DIR) or use --tokenizer=bpe:N") from None
    except datasets.data_files.EmptyDatasetError as e:  # (a FileNotFoundError: before the clause below)
        raise UserError(f"{first_line(e)}: give --dataset a folder of .parquet, .json(l) or .txt files, or "
                        "use --train_files") from None
    except (datasets.exceptions.DatasetNotFoundError, FileNotFoundError) as e:  # (a local path: FileNotFoundError)
        raise UserError(f"{first_line(e)}; check --dataset, or give local files with --train_files") from None
    if val is None:
        source["val"] = f"{cfg.val_fraction} of the training stories held out (seed {cfg.seed})"
    return train, val, source


def unresolved_hub_host():
    """The hub's host name when it does not resolve and no proxy would resolve it for us (offline), else None."""
    import socket
    import urllib.parse
    import urllib.request

    import huggingface_hub.constants

    host = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT).hostname
    if urllib.request.getproxies():
        return None
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return host
    return None


def source_error(e, what, cache_dir):
    """The one-line error for datasets failing to turn `what` (a local file, or a --dataset) into its Arrow cache:
    text that is not UTF-8, a full cache, or a malformed file; None for any other OSError (not found, offline), which
    passes on unchanged."""
    import datasets

    cause = e.__cause__ or e if isinstance(e, datasets.exceptions.DatasetGenerationError) else e
    is_file = os.path.isfile(what)
    if not is_file:
        what = f"--dataset={what}"
    if isinstance(cause, UnicodeDecodeError):
        return not_utf8(what if is_file else f"a file of {what}", cause, what if is_file else None)
    cache = cache_dir or datasets.config.HF_DATASETS_CACHE
    if isinstance(cause, OSError) and (cause.errno in (errno.ENOSPC, errno.EDQUOT)
                                       or str(cause).startswith("Not enough disk space")):  # (datasets' own check)
        why = cause.strerror or "not enough disk space"
        return UserError(f"cannot write the datasets cache at {cache} while reading {what} ({why}): free some space "
                         "there, or point --cache_dir=DIR at a disk with room")
    if isinstance(cause, OSError) and cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        # (the inputs were all read already, for their sha256: what cannot be written is the cache)
        return UserError(f"cannot write the datasets cache at {cache} ({cause.strerror}: {cause.filename}): point "
                         "--cache_dir=DIR at a folder you can write")
    if isinstance(e, OSError) and not (type(e) is OSError and e.errno is None):  # (pyarrow's errors are plain
        return None  # OSErrors without an errno: a malformed file)
    return UserError(f"datasets could not read {what} ({first_line(cause)}); check that it is valid")


def read_stories(arrow_files, column, is_txt, chunk_bytes, bar, repair, what):
    """
    Yield lists of stories, about chunk_bytes of text at a time, reading the Arrow files record batch by batch;
    with repair, mis-encoded punctuation is mended (fix_mojibake). The stories are the same whatever chunk_bytes.
    `what` names the source in errors.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    def row_chunks():
        rows, size = [], 0
        for path in arrow_files:
            with pa.OSFile(path) as f:
                for batch in pa.ipc.open_stream(f):
                    text = batch.column(column)
                    step = max(1, int(len(text) * chunk_bytes / max(text.nbytes, 1)))
                    for start in range(0, len(text), step):  # Arrow batches can be bigger than a chunk
                        piece = text.slice(start, step)
                        try:
                            rows += piece.to_pylist()
                        except UnicodeDecodeError as e:  # (a .json/.jsonl/.parquet string that is not UTF-8)
                            raise not_utf8(f"a story in {what}", e, what if os.path.isfile(what) else None
                                           ) from None
                        size += piece.nbytes
                        bar.update(len(piece))
                        if size >= chunk_bytes:
                            yield rows
                            rows, size = [], 0
        yield rows

    def keep(stories):  # a story with nothing in it is not a story
        return [fix_mojibake(s) if repair else s for s in stories if s and not s.isspace()]

    if not is_txt:
        for rows in row_chunks():
            yield keep(rows)
        return
    # .txt rows are lines with their line breaks. What separates the stories is decided for the whole file first:
    # lines of <|endoftext|> if it has one anywhere, else blank lines.
    def has_eot_line():
        for path in arrow_files:
            with pa.OSFile(path) as f:
                for batch in pa.ipc.open_stream(f):
                    if pc.any(pc.match_substring_regex(batch.column(column), r"^<\|endoftext\|>\n?$")).as_py():
                        return True
        return False

    separator = EOT_LINE if has_eot_line() else BLANK_LINES

    def split(text, last):
        """The stories in text, and the unfinished rest. A separator that reaches the end of the text may go on in
        the next chunk (blank lines), so unless this is the last text the story before it waits for that chunk."""
        ends = list(separator.finditer(text))
        if not last and ends and ends[-1].end() == len(text):
            ends.pop()
        stories, start = [], 0
        for end in ends:
            stories.append(text[start:end.start()])
            start = end.end()
        return stories, text[start:]

    # join a chunk's lines, split them into stories, and carry the unfinished last story into the next chunk
    carry = ""
    for lines in row_chunks():
        stories, carry = split(carry + "".join(lines), last=False)
        yield keep([s.strip("\n") for s in stories])
    stories, carry = split(carry, last=True)
    yield keep([s.strip("\n") for s in stories + [carry]])


def progress_bar(sources, desc):
    """A tqdm bar (to stderr) over the rows of the sources: stories, or lines of .txt files."""
    from tqdm import tqdm

    return tqdm(total=sum(rows for _, rows, _, _, _ in sources), unit="rows", unit_scale=True, desc=desc,
                mininterval=1, file=sys.stderr)


def story_chunks(train, val, cfg, bar):
    """
    Yield (train stories, val stories) a chunk at a time: the training sources, holding out val_fraction of their
    stories (a seeded draw per story, the same on every run) when val is None, then the val sources.
    """
    rng = random.Random(cfg.seed)
    for split, sources in (("train", train), ("val", val or [])):
        for arrow_files, _, column, is_txt, what in sources:
            chunk_bytes = int(cfg.chunk_mb * 1e6)
            for stories in read_stories(arrow_files, column, is_txt, chunk_bytes, bar, cfg.fix_mojibake, what):
                if split == "val":
                    yield [], stories
                elif val is not None:
                    yield stories, []
                else:
                    held_out = [rng.random() < cfg.val_fraction for _ in stories]
                    yield [s for s, h in zip(stories, held_out) if not h], [s for s, h in zip(stories, held_out) if h]


def train_bpe(vocab_size, texts, path):
    """Train a byte-level BPE of vocab_size tokens (end-of-text included) on an iterator of story lists; save it."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    # GPT-2's split into words, over bytes, and all 256 bytes in the vocabulary from the start, so any UTF-8 text
    # encodes and decodes back exactly, even characters the training text never had.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT_TEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    try:
        tokenizer.save(path)
    except Exception as e:  # tokenizers reports a full disk as a bare Exception ("No space left on device")
        raise OSError(f"writing {path}: {e}") from None


def write_tokens(chunks, tokenizer, dtype, train_path, val_path, workers, bar):
    """
    Encode the (train, val) story chunks on `workers` threads (tiktoken and tokenizers release the GIL while they
    work) and append the ids to the two files in order. At most workers + 1 chunks are in flight, so memory stays flat.
    """
    import collections
    from concurrent.futures import ThreadPoolExecutor

    counts = {split: {"tokens": 0, "stories": 0, "bytes": 0} for split in ("train", "val")}

    def encode(stories):
        return tokenizer.encode_stories(stories).astype(dtype), len(stories), sum(len(s.encode()) for s in stories)

    def write_oldest():
        for split, future in pending.popleft().items():
            ids, stories, nbytes = future.result()
            files[split].write(memoryview(ids))
            c = counts[split]
            c["tokens"], c["stories"], c["bytes"] = c["tokens"] + len(ids), c["stories"] + stories, c["bytes"] + nbytes
        elapsed = time.time() - start
        bar.set_postfix_str(f"{(counts['train']['stories'] + counts['val']['stories']) / elapsed:,.0f} stories/s, "
                            f"{(counts['train']['tokens'] + counts['val']['tokens']) / elapsed / 1e6:.2f}M tokens/s",
                            refresh=False)

    start, pending = time.time(), collections.deque()
    with open(train_path, "wb") as train_file, open(val_path, "wb") as val_file, ThreadPoolExecutor(workers) as pool:
        files = {"train": train_file, "val": val_file}
        for train_stories, val_stories in chunks:
            pending.append({"train": pool.submit(encode, train_stories), "val": pool.submit(encode, val_stories)})
            if len(pending) > workers:
                write_oldest()
        while pending:
            write_oldest()
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    return counts


if __name__ == "__main__":
    run_main(main)
