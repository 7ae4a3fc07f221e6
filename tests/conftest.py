"""Shared test set-up: offline, the genuine GPT-2 BPE files from ../shared when present, the repo on sys.path."""

import os
import sys

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
