"""
Documented behaviour, each test built to fail if the behaviour it names regressed: the chunked LM-head loss over
several chunks, --always_save_checkpoint, --grad_clip, --decay_lr, the CPU recipe, prepare's --dtype=auto, DDP logging
and the device default for --compile.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import train
from cli import parse_config
from test_train import ROOT, TINY, make_dataset, run_train
from train import ChunkedLMHeadLoss, TrainConfig


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    make_dataset(str(path))
    return str(path)


# --- the chunked LM-head loss -------------------------------------------------


@pytest.mark.parametrize("rows", [3 * 256 + 37, 4 * 256])  # a ragged last chunk, and whole chunks only
def test_chunked_lm_head_loss_over_several_chunks_is_cross_entropy(rows):
    """Loss, grad_x and grad_weight summed over chunks and scaled by 1/rows, in float64 against F.cross_entropy."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 24, dtype=torch.float64, generator=generator)
    weight = torch.randn(100, 24, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 100, (rows,), generator=generator)
    upstream = 0.25  # the gradient from above (1/grad_accum in train.py) scales both; exact in the float32 loss
    results = []
    for chunked in (True, False):
        x_, w_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            loss = ChunkedLMHeadLoss.apply(x_, w_, targets, 256)
        else:
            loss = F.cross_entropy(x_ @ w_.T, targets)
        (loss * upstream).backward()
        results.append((loss.detach().double(), x_.grad, w_.grad))
    (loss_c, gx_c, gw_c), (loss_f, gx_f, gw_f) = results
    assert loss_c.item() == pytest.approx(loss_f.item(), rel=1e-6)  # (the chunked sum is kept in float32)
    assert torch.allclose(gx_c, gx_f, rtol=0, atol=1e-12)
    assert torch.allclose(gw_c, gw_f, rtol=0, atol=1e-12)
    # every chunk's rows contributed: the last chunk's targets move the loss and the gradient
    assert gx_c[-1].abs().sum() > 0 and gx_c[256 * (rows // 256) - 1].abs().sum() > 0


# --- --eval_only with a bpe:N tokenizer ----------------------------------------------------


def test_eval_only_leaves_the_runs_tokenizer_untouched(tmp_path):
    """train.py copies tokenizer.json into out_dir for sample.py; evaluating must not write it (or anything) again."""
    from test_sample import write_stories
    from test_train import files_with_mtimes

    import prepare

    write_stories(tmp_path / "train.txt", 200, seed=0)
    write_stories(tmp_path / "val.txt", 40, seed=1)
    data, out = tmp_path / "data", tmp_path / "out"
    prepare.main([f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}",
                  "--tokenizer=bpe:300", f"--data_dir={data}", f"--cache_dir={tmp_path / 'hf-cache'}"])
    run_train(str(data), out, "--max_iters=1", "--eval_interval=1", "--plot=True", "--peak_flops=1e12")
    before = files_with_mtimes(out)
    assert {"ckpt.pt", "log.jsonl", "loss.png", "tokenizer.json"} <= set(before)
    run_train(str(data), out, "--eval_only=True", "--plot=True", "--peak_flops=1e12")
    assert files_with_mtimes(out) == before
