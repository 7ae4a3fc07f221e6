"""Shared test set-up: offline, the genuine GPT-2 BPE files from ../shared when present, the repo on sys.path."""

import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_shared_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken-cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = _shared_cache
# No test touches the network: the hub code path runs on local files through `datasets`.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# datasets gives its loggers a handler on the sys.stderr of the moment it is first imported: imported in a test that
# captures output (capsys), the handler would keep that test's stream, closed once it ends, and a later test's log
# record would print a "Logging error" traceback into that test's stderr. Imported here, it has the session's.
import datasets  # noqa: E402,F401


@pytest.fixture(scope="module")
def one_thread():
    """
    For modules of tiny models: a second thread only adds synchronisation, and on a busy machine (CI runs test files
    side by side) OpenMP's waiting threads made training 20x slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_dataset(path, vocab_size=64, train_tokens=20_000, val_tokens=4_000, seed=0, dtype="uint16"):
    """A learnable token stream: 'stories' that count upwards from a random start, each ended by the last id. Its
    text is 4 bytes a token in train, 3 in val (so that bits/byte can only come from val's)."""
    rng = np.random.default_rng(seed)
    eot = vocab_size - 1
    meta = {"tokenizer": f"bpe:{vocab_size}", "tokenizer_file": None, "vocab_size": vocab_size, "eot_token": eot,
            "dtype": dtype}
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        ids, stories = [], 0
        while len(ids) < n:
            start, length = rng.integers(0, eot), rng.integers(4, 24)
            ids += [(start + i) % eot for i in range(length)] + [eot]
            stories += 1
        np.array(ids, dtype=dtype).tofile(os.path.join(path, f"{split}.bin"))
        meta[split] = {"file": f"{split}.bin", "tokens": len(ids), "stories": stories,
                       "bytes": (4 if split == "train" else 3) * len(ids)}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    make_dataset(str(path))
    return str(path)
