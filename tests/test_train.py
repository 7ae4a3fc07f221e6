"""train.py on CPU: the model's invariants, the data sampler, the schedule, checkpoints, resume and DDP."""

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from cli import UserError
from conftest import make_dataset
from train import GPT, GPTConfig, TrainConfig, get_batch, get_lr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these models are tiny
# --dtype=float32: runs that tests compare (straight against resumed, DDP against one process) must train in the same
# dtype, and auto times both on a CPU with fast bf16, where a close call could land either way
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8",
        "--gradient_accumulation_steps=2", "--eval_tokens=512", "--log_interval=1", "--warmup_iters=2",
        "--learning_rate=3e-3", "--min_lr=3e-4", "--device=cpu", "--dtype=float32", "--compile=False", "--plot=False"]


def run_train(data_dir, out_dir, *flags):
    train.main(["--data_dir=" + data_dir, "--out_dir=" + str(out_dir), *TINY, *flags])


def tiny_model(**overrides):
    torch.manual_seed(0)
    args = dict(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
    args.update(overrides)
    return GPT(GPTConfig(**args))


# --- model ------------------------------------------------------------------


def test_init_is_gpt2s():
    model = tiny_model(n_layer=8, n_embd=128, n_head=4)
    for name, p in model.named_parameters():
        if p.dim() == 2 and "wpe" not in name:  # (the positions are 0.02 too, with 16 rows too few to say so)
            std = 0.02 / math.sqrt(2 * 8) if name.endswith("c_proj.weight") else 0.02  # residual ones: by depth
            assert p.std().item() == pytest.approx(std, rel=0.05), name
        elif p.dim() == 1:
            assert torch.all(p == (1.0 if "ln_" in name and name.endswith(".weight") else 0.0)), name  # biases 0


def test_causality_future_tokens_never_change_past_logits():
    model = tiny_model().eval()
    idx = torch.randint(0, 50, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        y1 = torch.zeros_like(idx)
        logits_a, _ = model(idx, y1)
        logits_b, _ = model(changed, y1)
    assert torch.allclose(logits_a[:, :10], logits_b[:, :10], atol=1e-6)
    assert not torch.allclose(logits_a[:, 10:], logits_b[:, 10:])


def test_initial_loss_is_about_ln_vocab():
    model = tiny_model(vocab_size=500)
    idx = torch.randint(0, 500, (4, 16))
    _, loss = model(idx, torch.randint(0, 500, (4, 16)))
    assert abs(loss.item() - math.log(500)) < 0.25


def test_embedding_is_padded_and_tied():
    model = tiny_model(vocab_size=50)
    assert model.lm_head.weight.shape[0] == 64
    assert model.transformer.wte.weight is model.lm_head.weight


@pytest.mark.parametrize("bias", [True, False])
def test_chunked_loss_matches_plain_cross_entropy(bias):
    # 50 x 16 = 800 rows: three 256-row chunks and a ragged fourth, so the sum over chunks and the 1/n scaling count
    idx, targets = torch.randint(0, 50, (50, 16)), torch.randint(0, 50, (50, 16))
    grads = []
    for chunked in (False, True):
        model = tiny_model(bias=bias)
        model.chunked_loss, model.chunked_loss_rows = chunked, 256
        logits, loss = model(idx, targets)
        assert (logits is None) == chunked  # the chunked path never makes the full logits
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        assert torch.allclose(a, b, atol=1e-6)


def test_tiny_batch_overfits():
    model = tiny_model()
    model.chunked_loss = True
    (optimizer,) = train.configure_optimizers(model, TrainConfig(optimizer="adamw", weight_decay=0.0,
                                                                 learning_rate=3e-3), "cpu")
    idx = torch.randint(0, 50, (2, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    for _ in range(200):
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    assert loss.item() < 0.05


def test_generate_never_samples_padding_ids():
    model = tiny_model(vocab_size=50)
    with torch.no_grad():
        model.lm_head.weight[50:] = 10.0  # with a positive final hidden state, the padding rows are the most likely
        model.transformer.ln_f.bias.fill_(1.0)
    out = model.generate(torch.zeros((4, 1), dtype=torch.long), 20, temperature=1.0)
    assert out.max().item() < 50


# The KV cache is tested in test_sample.py, on models that read their whole context: an untrained one here barely
# does, and passed with attention cut to the last 6 cached positions.


# --- data -------------------------------------------------------------------


def test_get_batch_windows_come_from_the_stream(data_dir):
    meta = train.load_meta(data_dir)
    stream = np.fromfile(os.path.join(data_dir, "train.bin"), dtype=np.uint16).astype(np.int64)
    starts = train.train_window_starts(1, 0, 16, len(stream), 32)
    x, y = get_batch(data_dir, meta, "train", starts, 32, torch.device("cpu"))
    assert x.shape == y.shape == (16, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for start, row_x, row_y in zip(starts, x.tolist(), y.tolist()):
        assert row_x + row_y[-1:] == stream[start:start + 33].tolist()


def test_training_windows_visit_every_window_once_per_epoch():
    tokens, block_size = 1_000, 32
    windows = (tokens - 1) // block_size - 1  # 30 per epoch
    starts = train.train_window_starts(7, 0, 3 * windows, tokens, block_size)
    assert starts.min() >= 0 and starts.max() + block_size + 1 <= tokens
    for epoch in np.split(starts, 3):
        offset = epoch.min() % block_size
        assert sorted(epoch) == [offset + i * block_size for i in range(windows)]  # each window once, shuffled
    assert len({tuple(epoch) for epoch in np.split(starts, 3)}) == 3  # a new order (and offset) each epoch
    # any slice of the stream is the same whether asked for at once or batch by batch (resume, other world sizes)
    assert np.array_equal(starts[45:61], train.train_window_starts(7, 45, 16, tokens, block_size))
    assert not np.array_equal(starts, train.train_window_starts(8, 0, 3 * windows, tokens, block_size))
    assert list(train.train_window_starts(0, 0, 3, 33, 32)) == [0, 0, 0]  # the shortest split a window fits


def test_each_epoch_shifts_its_windows_by_a_new_offset():
    split_tokens, block_size = 1000, 32
    windows = (split_tokens - 1) // block_size - 1
    starts = train.train_window_starts(7, 0, 10 * windows, split_tokens, block_size)
    offsets = {int(epoch.min()) % block_size for epoch in np.split(starts, 10)}
    assert len(offsets) > 1  # the same aligned windows every epoch would never train on the split's tail


def test_training_reads_every_window_once_per_epoch(tmp_path, monkeypatch):
    data, evaluating, seen = tmp_path / "data", [], []
    data.mkdir()
    tokens = make_dataset(str(data), train_tokens=2_000)["train"]["tokens"]
    windows = (tokens - 1) // 32 - 1
    real_get_batch, real_estimate_loss = train.get_batch, train.estimate_loss

    def recording_get_batch(data_dir, meta, split, starts, block_size, device):
        if split == "train" and not evaluating:
            seen.extend(int(start) for start in starts)
        return real_get_batch(data_dir, meta, split, starts, block_size, device)

    def flagged_estimate_loss(*args):
        evaluating.append(True)
        try:
            return real_estimate_loss(*args)
        finally:
            evaluating.pop()

    monkeypatch.setattr(train, "get_batch", recording_get_batch)
    monkeypatch.setattr(train, "estimate_loss", flagged_estimate_loss)
    run_train(str(data), tmp_path / "out", f"--max_iters={-(-2 * windows // 16)}")  # two epochs of 16 windows a step
    for epoch in (seen[:windows], seen[windows:2 * windows]):
        assert sorted(start - min(epoch) for start in epoch) == [32 * i for i in range(windows)]


def test_evaluation_uses_the_same_windows_whatever_the_batch_size(data_dir):
    meta = train.load_meta(data_dir)
    model = tiny_model(vocab_size=64, block_size=32).double()  # only the windows may differ, not the arithmetic
    seen = []

    def batch_fn(batch_size):
        def batch(split, starts):
            seen[-1].extend(starts.tolist())
            return get_batch(data_dir, meta, split, starts, 32, torch.device("cpu"))
        return batch

    losses = []
    for batch_size in (3, 16, 64):
        seen.append([])
        losses.append(train.estimate_loss(model, batch_fn(batch_size), meta, 40 * 32, 32, batch_size,
                                          contextlib.nullcontext()))
    assert seen[0] == seen[1] == seen[2] and len(seen[0]) == 2 * 40
    for other in losses[1:]:
        assert other["val"] == pytest.approx(losses[0]["val"], rel=1e-6)
        assert other["train"] == pytest.approx(losses[0]["train"], rel=1e-6)


def test_evaluation_windows_are_evenly_spaced_and_tile_a_split_they_cover():
    few = train.eval_starts(10_000, 32, 10 * 32)
    assert len(few) == 10 and few[0] == 0 and np.all(np.diff(few) == np.diff(few)[0]) and few[-1] > 10_000 * 0.85
    tiles = train.eval_starts(1_001, 32, 10**6)  # more tokens asked than the split has: each token once
    assert len(tiles) == 1_000 // 32 and np.all(np.diff(tiles) >= 32)
    assert tiles[-1] + 32 + 1 <= 1_001 and 1_001 - (tiles[-1] + 32 + 1) < 32  # in range; the tail left is < a window
    assert list(train.eval_starts(33, 32, 64)) == [0]  # the shortest split a window fits
    exact = train.eval_starts(1_024, 32, 10**6)  # a split of whole windows: the last needs its next token, so 31 fit
    assert len(exact) == 31 and np.all(np.diff(exact) >= 32) and exact[-1] + 32 + 1 <= 1_024


def test_chunked_loss_under_no_grad_is_the_same_loss_without_gradients():
    model = tiny_model()
    idx, targets = torch.randint(0, 50, (50, 16)), torch.randint(0, 50, (50, 16))
    _, plain = model(idx, targets)
    model.chunked_loss, model.chunked_loss_rows = True, 256
    with torch.no_grad():
        logits, loss = model(idx, targets)
    assert logits is None  # the chunked path, not the full logits
    assert not loss.requires_grad and loss.item() == pytest.approx(plain.item(), rel=1e-6)


def test_get_batch_reads_uint32_streams(tmp_path):
    ids = np.arange(100, 200, dtype=np.uint32) + 70_000
    ids.tofile(tmp_path / "val.bin")
    meta = {"dtype": "uint32", "val": {"file": "val.bin", "tokens": 100}}
    x, y = get_batch(str(tmp_path), meta, "val", np.array([0, 50, 91]), 8, torch.device("cpu"))
    assert x.min().item() >= 70_100 and torch.equal(x[:, 1:], y[:, :-1])


def test_data_rebuilt_under_a_running_job_stops_it_with_a_message(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=2", "--eval_interval=2")
    load_meta = train.load_meta

    def rebuilt_after_loading(folder):  # prepare.py swaps in other data once the run has read meta.json
        meta = load_meta(folder)
        np.zeros(1000, dtype=np.uint16).tofile(os.path.join(folder, "train.bin"))
        return meta

    monkeypatch.setattr(train, "load_meta", rebuilt_after_loading)
    with pytest.raises(UserError, match=r"train.bin changed during the run: it holds 1,000 tokens, and [0-9,]+ "
                                        r"when the run started\. Let prepare.py finish, then continue with "
                                        r"--init_from=resume"):
        run_train(data_dir, out, "--max_iters=4", "--eval_interval=4", "--init_from=resume")
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 2  # the last good checkpoint stays


def test_data_shorter_than_block_size_names_both_sizes(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"the val split has 4\d{3} tokens, fewer than block_size \+ 1 = 8193"):
        run_train(data_dir, tmp_path / "out", "--block_size=8192", "--max_iters=1")
    val_tokens = train.load_meta(data_dir)["val"]["tokens"]  # exactly block_size tokens: one window needs one more
    with pytest.raises(UserError, match=rf"the val split has {val_tokens} tokens, fewer than block_size \+ 1"):
        run_train(data_dir, tmp_path / "out", f"--block_size={val_tokens}", "--max_iters=1")


def test_evaluation_leaves_the_model_training(data_dir):
    meta = train.load_meta(data_dir)
    model = tiny_model(vocab_size=64, block_size=32, dropout=0.1).train()

    def batch(split, starts):
        return get_batch(data_dir, meta, split, starts, 32, torch.device("cpu"))

    train.estimate_loss(model, batch, meta, 64, 32, 2, contextlib.nullcontext())
    assert model.training  # else dropout would be off for the rest of the run


# --- optimizer and schedule -------------------------------------------------


def test_wsd_decay_frac_sets_where_the_decay_starts():
    config = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_schedule="wsd",
                         decay_frac=0.5)
    lrs = [get_lr(step, config) for step in range(100)]
    assert lrs[48] == pytest.approx(1e-3)  # stable until the last half
    assert lrs[74] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half-way down that half
    assert lrs[99] == pytest.approx(1e-4)


def test_lr_schedule_warmup_peak_and_end():
    c = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_decay_iters=0)
    assert get_lr(0, c) == pytest.approx(1e-3 / 11)  # never zero at the first step
    assert get_lr(10, c) == pytest.approx(1e-3)
    assert get_lr(55, c) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert get_lr(100, c) == pytest.approx(1e-4)
    assert get_lr(500, c) == pytest.approx(1e-4)
    lrs = [get_lr(i, c) for i in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_weight_decay_only_on_matrices():
    model = tiny_model(bias=True)
    (optimizer,) = train.configure_optimizers(model, TrainConfig(optimizer="adamw", weight_decay=0.1), "cpu")
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert optimizer.defaults["fused"]  # the fused kernel, exercised here on the CPU


@pytest.mark.parametrize("flags, message", [
    (["--min_lr=1e-2", "--learning_rate=1e-3"], "is above --learning_rate=0.001, so the learning rate would rise"),
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 must be a multiple of --n_head=4"),
    (["--warmup_iters=50", "--lr_decay_iters=10"], "--lr_decay_iters=10 must be 0 (= max_iters) or at least"),
    (["--init_from=gpt2"], "--init_from=gpt2: OpenAI's GPT-2 weights are not loaded here; train from scratch"),
    (["--init_from=other"], "--init_from must be 'scratch' or 'resume'"),
    (["--dtype=float8"], "--dtype must be auto, float32, bfloat16 or float16"),
    (["--batch_size=0"], "--batch_size must be at least 1"),
    (["--min_lr=-1e-3"], "--min_lr must be 0 or more"),  # torch would train at a negative learning rate
    (["--weight_decay=-0.1"], "--weight_decay must be 0 (none) or more"),  # torch: a traceback
    (["--beta1=1.5"], "--beta1 and --beta2 must be in [0, 1)"),
    (["--beta2=1"], "--beta1 and --beta2 must be in [0, 1)"),
    (["--peak_flops=-1e9"], "--peak_flops must be 0"),  # it printed a negative MFU
    (["--gelu=none"], "--gelu must be tanh or exact, got 'none'"),
    (["--lr=1"], "unknown setting 'lr'"),
    (["--device=tpu"], "unknown device 'tpu'"),
])
def test_bad_settings_are_rejected_with_a_message(data_dir, tmp_path, flags, message):
    with pytest.raises(UserError) as e:
        run_train(data_dir, tmp_path / "out", "--max_iters=1", *flags)
    assert message in str(e.value)


def test_missing_dataset_and_checkpoint(tmp_path):
    with pytest.raises(UserError, match="no dataset at .* run prepare.py first"):
        train.main([f"--data_dir={tmp_path}/nothing", "--device=cpu"])
    (tmp_path / "data").mkdir()
    make_dataset(str(tmp_path / "data"))
    with pytest.raises(UserError, match="no checkpoint at .*ckpt.pt"):
        run_train(str(tmp_path / "data"), tmp_path / "typo" / "out", "--init_from=resume")
    assert not (tmp_path / "typo").exists()  # a mistyped --out_dir is not made


def test_a_uint32_dataset_trains(tmp_path):
    """prepare.py writes uint32 ids for a vocabulary over 65,536 tokens."""
    (tmp_path / "data").mkdir()
    make_dataset(str(tmp_path / "data"), dtype="uint32")
    run_train(str(tmp_path / "data"), tmp_path / "out", "--max_iters=2", "--eval_interval=2")
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 2] and rows[0]["val_loss"] == pytest.approx(math.log(64), abs=0.3)


# --- the loop ---------------------------------------------------------------


def test_training_learns_and_writes_log_plot_checkpoint(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=40", "--eval_interval=20", "--plot=True")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [0, 20, 40]
    assert set(rows[0]) == {"iter", "tokens", "train_loss", "val_loss", "val_bpb", "lr", "elapsed_s", "train_s"}
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0
    assert rows[-1]["tokens"] == 40 * 2 * 8 * 32
    assert rows[0]["val_bpb"] == pytest.approx(rows[0]["val_loss"] / math.log(2) / 3)  # val's 3 bytes a token (not 4)
    assert (out / "loss.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "config: out_dir=" in printed
    assert "iter 40/40 | loss" in printed and "tok/s | mfu" in printed and "| eta 0m00s" in printed
    assert "note:" not in printed
    shown = dict(re.findall(r"^iter (\d+)/40 \| loss [\d.]+ \| lr ([\d.e+-]+) \|", printed, re.M))
    assert [f"{r['lr']:.2e}" for r in rows[1:]] == [shown["20"], shown["40"]]  # the same rate as the progress line
    assert rows[0]["lr"] == pytest.approx(3e-3 / 3)  # at iter 0 the first step's: warmup's first of 2 steps
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)  # plain tensors and containers only
    assert checkpoint["iter_num"] == 40 and checkpoint["meta"]["vocab_size"] == 64
    assert {"model", "optimizer", "scaler", "config", "model_args", "rng", "best_val_loss"} <= set(checkpoint)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in checkpoint["model"])


def test_no_mfu_is_printed_without_a_peak(data_dir, tmp_path, monkeypatch, capsys):
    # a GPU missing from the table (or an MPS device) has no known peak: "mfu 0.0%" would say the run does nothing
    monkeypatch.setattr(train, "peak_flops_of", lambda device, dtype: 0.0)
    run_train(data_dir, tmp_path / "out", "--max_iters=2", "--eval_interval=2")
    printed = capsys.readouterr().out
    line = r"^iter 2/2 \| loss [\d.]+ \| lr [\d.e+-]+ \| [\d.]+ ms/iter \| [\d,]+ tok/s \| eta 0m00s$"
    assert re.search(line, printed, re.M)
    assert "note: --warmup_iters=2 is not below --max_iters=2, so the whole run is warmup" in printed


@pytest.mark.parametrize("later", ["faster", "slower still"])
def test_mfu_over_100_percent_measures_the_cpu_peak_again(data_dir, tmp_path, monkeypatch, capsys, later):
    # the peak measured while a neighbour on the host kept the CPU busy: too low, so MFU would read over 100%
    probes = []

    def matmul_flops(dtype, size, repeats=3):
        probes.append(size)
        if len(probes) > 1:
            time.sleep(0.5)  # a probe during training takes time that is not training time
        return 1e6 if len(probes) == 1 else 1e15 if later == "faster" else 1e3

    matmul_flops.cache_clear = lambda: None
    monkeypatch.setattr(train, "matmul_flops", matmul_flops)
    run_train(data_dir, tmp_path / "out", "--max_iters=6", "--eval_interval=6")
    lines = re.findall(r"\| ([\d,]+) tok/s \| mfu ([\d.]+)% \|", capsys.readouterr().out)
    mfus = [float(mfu) for _, mfu in lines]
    assert len(mfus) == 6
    last = json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])
    assert last["train_s"] < last["elapsed_s"] - 0.5 * (len(probes) - 1) + 0.1  # the probes are off the clock
    if later == "faster":
        assert len(probes) == 2 and max(mfus) < 100  # measured again once, at the first reading over 100%
    else:
        assert len(probes) == 4 and min(mfus) > 100  # a few times at most: the log lines keep coming
        model = GPT(GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, bias=False))  # TINY's
        peaks = [model.flops_per_token() * float(tok_s.replace(",", "")) / (mfu / 100)
                 for (tok_s, _), mfu in zip(lines, mfus)]
        assert peaks == pytest.approx([1e6] * 6, rel=0.01)  # a slower reading never lowers the peak


def files_with_mtimes(folder):
    """Every file under folder: its bytes and modification time."""
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def test_eval_only_reports_and_writes_nothing(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=4", "--plot=True")
    capsys.readouterr()
    before = files_with_mtimes(out)
    assert {"ckpt.pt", "log.jsonl", "loss.png"} <= set(before)
    run_train(data_dir, out, "--init_from=resume", "--eval_only=True", "--plot=True")
    assert "eval iter 4: train loss" in capsys.readouterr().out
    assert files_with_mtimes(out) == before  # every file, byte for byte and untouched, and no new one


def straight_and_resumed(data_dir, tmp_path, *flags):
    """8 steps straight, and 4 then 4 more resumed, with the same flags: both final checkpoints, checked equal."""
    common = ["--lr_decay_iters=8", "--eval_interval=4", "--dropout=0.1", *flags]  # dropout: to cover the RNG
    run_train(data_dir, tmp_path / "straight", "--max_iters=8", *common)
    run_train(data_dir, tmp_path / "resumed", "--max_iters=4", *common)
    run_train(data_dir, tmp_path / "resumed", "--max_iters=8", "--init_from=resume", *common)
    a = torch.load(tmp_path / "straight" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "ckpt.pt", weights_only=True)
    assert a["iter_num"] == b["iter_num"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    return a, b


def test_resume_is_exact(data_dir, tmp_path):
    """N steps, then resume for N more, ends with the same weights as 2N steps straight (dropout on, to cover RNG)."""
    straight_and_resumed(data_dir, tmp_path)
    log = [json.loads(line) for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    straight = [json.loads(line) for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in log] == [r["val_loss"] for r in straight]


def test_checkpoint_write_is_atomic(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=4")
    good = torch.load(out / "ckpt.pt", weights_only=True)

    def crash_midway(obj, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        run_train(data_dir, out, "--max_iters=8", "--eval_interval=4", "--init_from=resume")
    after = torch.load(out / "ckpt.pt", weights_only=True)
    assert after["iter_num"] == good["iter_num"] == 4


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=4")
    real_forward = GPT.forward

    def forward_nan_after_iter_6(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        if torch.is_grad_enabled() and forward_nan_after_iter_6.calls >= 2 * 2:  # micro-steps of iters 5 and 6
            loss = loss * float("nan")
        forward_nan_after_iter_6.calls += torch.is_grad_enabled()
        return logits, loss

    forward_nan_after_iter_6.calls = 0
    monkeypatch.setattr(GPT, "forward", forward_nan_after_iter_6)
    with pytest.raises(UserError, match=r"the loss became nan at iter 7; .*ckpt.pt keeps the last good checkpoint"):
        run_train(data_dir, out, "--max_iters=20", "--eval_interval=4", "--init_from=resume")
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4


def test_bfloat16_autocast_on_cpu(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    linear_outputs = []  # (training?, dtype) of every Linear's output: evidence that autocast ran, not the flag echoed

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            linear_outputs.append((torch.is_grad_enabled(), output.dtype))

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        run_train(data_dir, out, "--max_iters=6", "--eval_interval=6", "--dtype=bfloat16")
    finally:
        hook.remove()
    assert "device cpu, dtype bfloat16," in capsys.readouterr().out
    assert {training for training, _ in linear_outputs} == {True, False}  # training steps and evaluation both
    assert {dtype for _, dtype in linear_outputs} == {torch.bfloat16}
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values())  # float32 master weights: autocast
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]


def test_torch_compile_on_cpu(data_dir, tmp_path, capsys):
    from torch._dynamo.utils import counters

    out = tmp_path / "out"
    torch._dynamo.reset()
    counters.clear()
    try:
        run_train(data_dir, out, "--max_iters=3", "--eval_interval=3", "--compile=True")
        graphs = counters["stats"]["unique_graphs"]  # dynamo's count of the graphs it compiled: evidence it ran
    finally:
        torch._dynamo.reset()
    assert graphs >= 1
    assert "compile True" in capsys.readouterr().out
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert not any(k.startswith("_orig_mod.") for k in checkpoint["model"])
    assert math.isfinite(checkpoint["best_val_loss"])


def test_compiled_generation_has_no_graph_break_and_matches_eager():
    # The cached decode step once fell back to eager: is_causal=T > 1 is symbolic under dynamic shapes.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16, dropout=0.0, bias=False)
    model = GPT(config).eval()
    prompt = torch.tensor([[1, 2, 3]])
    eager = model.generate(prompt, 20, temperature=0)  # past block_size: the window slides once
    torch._dynamo.reset()
    counters.clear()
    model.compile(dynamic=True)
    compiled = model.generate(prompt, 20, temperature=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()


def _cli(*args, **kwargs):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_cli_error_is_one_line_without_traceback(data_dir, tmp_path):
    proc = _cli(f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--min_lr=1", "--learning_rate=0.1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("train.py: error: --min_lr=1 is above --learning_rate=0.1")


def test_total_batch_size_derives_the_micro_steps(data_dir, tmp_path, capsys):
    # 512 tokens per step from micro-batches of 8 x 32 is 2 micro-steps: the same run as giving the 2 directly
    run_train(data_dir, tmp_path / "given", "--max_iters=3", "--eval_interval=3")
    run_train(data_dir, tmp_path / "derived", "--max_iters=3", "--eval_interval=3", "--gradient_accumulation_steps=0",
              "--total_batch_size=512")
    assert "2 micro-step(s) of 8 x 32 per process: 512 tokens/iter" in capsys.readouterr().out
    given, derived = (torch.load(tmp_path / name / "ckpt.pt", weights_only=True)["model"]
                      for name in ("given", "derived"))
    assert all(torch.equal(given[k], derived[k]) for k in given)
    with pytest.raises(UserError, match=r"--total_batch_size=500 must be a multiple of .* = 256"):
        run_train(data_dir, tmp_path / "bad", "--gradient_accumulation_steps=0", "--total_batch_size=500")


def test_micro_steps_are_shared_among_processes_with_a_hint_when_they_cannot_be():
    config = TrainConfig()  # 131,072 tokens per step in micro-batches of 64 x 512: 4 micro-steps
    assert [train.micro_steps_per_process(config, 512, n) for n in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(UserError, match=r"4 micro-steps per step must be a multiple of .* \(8\); try --batch_size=32"):
        train.micro_steps_per_process(config, 512, 8)


def test_resume_counts_the_checkpoints_block_size_not_the_flags(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=2", "--eval_interval=2", "--gradient_accumulation_steps=0",
              "--total_batch_size=512")  # 8 x 32 a micro-step: 2 of them
    train.main([f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_iters=3", "--eval_interval=3",
                "--init_from=resume", "--gradient_accumulation_steps=0", "--total_batch_size=512",
                "--block_size=64"])  # a stray flag: the model keeps its 32
    assert "2 micro-step(s) of 8 x 32 per process: 512 tokens/iter" in capsys.readouterr().out.split("resuming")[1]


@pytest.mark.parametrize("gelu, approximate", [("tanh", "tanh"), ("exact", "none")])
def test_gelu_follows_the_setting(gelu, approximate):
    model = tiny_model(gelu=gelu)
    x = torch.linspace(-4, 4, 101)
    for block in model.transformer.h:
        torch.testing.assert_close(block.mlp.gelu(x), F.gelu(x, approximate=approximate), atol=0, rtol=0)
    assert (F.gelu(x, approximate="tanh") - F.gelu(x)).abs().max() > 1e-4  # the two differ where it is checked


def test_gelu_is_the_checkpoints_and_older_checkpoints_are_tanh(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=2", "--eval_interval=2", "--gelu=exact")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["model_args"]["gelu"] == "exact"
    assert train.model_from_checkpoint(checkpoint).transformer.h[0].mlp.gelu.approximate == "none"
    # the architecture is the checkpoint's: a resume keeps the exact GELU whatever --gelu says
    capsys.readouterr()
    run_train(data_dir, out, "--max_iters=3", "--eval_interval=3", "--init_from=resume", "--gelu=tanh", "--n_layer=3")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["model_args"]["gelu"] == "exact"
    # and the config saved with it (shown by wandb and the model card) says what the model is, not what the flags said
    assert (checkpoint["config"]["gelu"], checkpoint["config"]["n_layer"]) == ("exact", 2)
    assert ("the model is the checkpoint's (n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, gelu=exact): "
            "--n_layer=3, --gelu=tanh ignored") in capsys.readouterr().out
    del checkpoint["model_args"]["gelu"]  # as saved before the setting existed: those models were all tanh
    assert train.model_from_checkpoint(checkpoint).transformer.h[0].mlp.gelu.approximate == "tanh"


def test_out_of_gpu_memory_is_one_line_with_the_fix(monkeypatch):
    def out_of_memory(argv):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "main", out_of_memory)
    with pytest.raises(UserError, match=r"out of GPU memory \(CUDA out of memory. Tried to allocate 2.00 GiB\): "
                                        r"lower --batch_size"):
        train.main_with_memory_hint([])


def test_help_documents_every_field():
    proc = _cli("--help")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    for name in ("out_dir", "gradient_accumulation_steps", "lr_decay_iters", "compile", "seed"):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{name}="))
        assert len(line.split(None, 1)[1]) > 5, line  # a description follows the default
    for field in dataclasses.fields(TrainConfig):
        line = next(line for line in out.splitlines() if line.strip().startswith(f"--{field.name}="))
        assert len(line.split(None, 1)[1]) > 5, line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])  # SIGTERM: a scheduler's or container's stop
def test_ctrl_c_saves_a_checkpoint(data_dir, tmp_path, signum):
    out = tmp_path / "out"
    proc = _cli(f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_iters=100000", "--eval_interval=100000")
    for line in proc.stdout:
        if line.startswith("iter 3/"):
            break
    proc.send_signal(signum)
    rest, err = proc.communicate(timeout=120)
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] >= 3
    assert proc.returncode == 130, err  # saved, but not finished: scripts can tell
    assert err == (f"train.py: interrupted: saved {out / 'ckpt.pt'} at iter {checkpoint['iter_num']}; continue with "
                   "--init_from=resume\n")


def test_ddp_two_processes_match_one(data_dir, tmp_path):
    """torchrun with 2 gloo processes and the same global batch gives the weights of one process (Muon and AdamW)."""
    common = [f"--data_dir={data_dir}", *TINY, "--max_iters=3", "--eval_interval=3", "--optimizer=muon"]
    single = subprocess.run([sys.executable, "train.py", f"--out_dir={tmp_path}/one", *common], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", f"--out_dir={tmp_path}/two", *common], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout and "1 micro-step(s) of 8 x 32 per process" in ddp.stdout
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_eval_only_evaluates_the_checkpoint_and_keeps_the_log(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=20", "--eval_interval=20")
    log = (out / "log.jsonl").read_text()
    trained_val_loss = json.loads(log.splitlines()[-1])["val_loss"]
    capsys.readouterr()
    run_train(data_dir, out, "--eval_only=True")  # no --init_from=resume: evaluating means the checkpoint
    printed = capsys.readouterr().out
    assert f"val loss {trained_val_loss:.4f}" in printed
    assert (out / "log.jsonl").read_text() == log


def test_resume_is_exact_in_float16_with_its_loss_scale(data_dir, tmp_path):
    a, b = straight_and_resumed(data_dir, tmp_path, "--dtype=float16")
    assert a["scaler"] == b["scaler"] and a["scaler"]["_growth_tracker"] == 8  # the scale and its count of good steps


def test_resume_in_float16_from_an_unscaled_run(data_dir, tmp_path):
    """A float32 run saves an empty GradScaler state; resuming with loss scaling (fp16) must still work."""
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=4")
    run_train(data_dir, out, "--max_iters=8", "--eval_interval=4", "--init_from=resume", "--dtype=float16")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 8 and checkpoint["scaler"]["scale"] > 0
    assert math.isfinite(checkpoint["val_loss"])


def test_a_gpu_index_past_the_last_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert train.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError) as e:
        train.pick_device("cuda:2")
    assert str(e.value) == ("--device=cuda:2 but this machine has 2 CUDA GPU(s), numbered from 0: use "
                            "--device=cuda:0 to cuda:1")


def test_cuda_rng_state_is_the_training_gpus_alone(monkeypatch):
    # older checkpoints held every visible GPU's state, and restoring them all failed on a machine with fewer GPUs
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    cpu_state = train.rng_state(torch.device("cpu"))
    assert cpu_state["cuda"] == []
    train.set_rng_state(cpu_state, torch.device("cpu"))
    assert restored == []
    states = [torch.full((4,), i, dtype=torch.uint8) for i in range(8)]  # as an 8-GPU run saved them
    for device, kept in [(torch.device("cuda"), 0), (torch.device("cuda", 3), 3), (torch.device("cuda", 9), 0)]:
        train.set_rng_state({**cpu_state, "cuda": states}, device)
        assert restored.pop() == (states[kept], device)
    train.set_rng_state({**cpu_state, "cuda": [states[5]]}, torch.device("cuda", 1))  # today's: the GPU's own
    assert restored.pop() == (states[5], torch.device("cuda", 1))


def test_one_run_at_a_time_in_an_out_dir_and_never_in_a_data_folder(data_dir, tmp_path):
    import cli

    os.makedirs(tmp_path / "out")
    lock = cli.lock_folder(str(tmp_path / "out"), "held")  # as another train.py holds it
    try:
        with pytest.raises(UserError, match=r"^another run is writing --out_dir=.*/out: wait for it to finish, "
                                            "or give this one another --out_dir$"):
            run_train(data_dir, tmp_path / "out", "--max_iters=1")
    finally:
        os.close(lock)
    run_train(data_dir, tmp_path / "out", "--max_iters=1", "--eval_interval=1")  # once it is free
    run_train(data_dir, tmp_path / "out", "--max_iters=2", "--eval_interval=1", "--init_from=resume")  # main let go
    os.makedirs(tmp_path / "other-data")
    make_dataset(str(tmp_path / "other-data"))  # another data folder: its tokenizer.json would be replaced
    with pytest.raises(UserError, match=r"^--out_dir=\S+ holds prepared data \(meta.json\): give the run a folder"):
        run_train(data_dir, tmp_path / "other-data", "--max_iters=1")


def test_a_new_run_leaves_no_earlier_runs_tokenizer(data_dir, tmp_path):
    os.makedirs(tmp_path / "out")
    for name in ("ckpt.pt", "tokenizer.json"):  # a bpe run's; this data needs no tokenizer.json
        (tmp_path / "out" / name).write_text("old")
    run_train(data_dir, tmp_path / "out", "--max_iters=1", "--eval_interval=1", "--overwrite=True")
    assert sorted(os.listdir(tmp_path / "out")) == ["ckpt.pt", "log.jsonl"]


def test_a_closed_stdout_stops_the_run_and_saves_it(data_dir, tmp_path):
    # `train.py | head`: the next progress line finds the pipe closed; as on Ctrl-C the step ends and is saved
    process = subprocess.Popen(
        [sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *TINY,
         "--max_iters=100000", "--eval_interval=100000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    while not (line := process.stdout.readline()).startswith("iter 3/"):
        assert line, process.stderr.read()  # (train.py ended before its third step)
    process.stdout.close()
    err = process.stderr.read()
    assert process.wait(timeout=120) == 130, err
    assert re.fullmatch(r"train.py: interrupted: saved \S+ckpt.pt at iter \d+; continue with --init_from=resume\n",
                        err), err
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["iter_num"] > 3


def test_torchrun_takes_no_device_index(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(UserError, match="under torchrun --device must be auto, cuda or cpu"):
        train.main([f"--data_dir={data_dir}", f"--out_dir={tmp_path}", "--device=cuda:1"])


def test_ctrl_c_never_saves_weights_that_are_not_finite(data_dir, tmp_path, monkeypatch):
    """Ctrl-C between progress lines, after the weights blew up: the last good checkpoint stays."""
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=4")
    good = (out / "ckpt.pt").read_bytes()
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def blow_up_then_ctrl_c(parameters, max_norm):  # called once a step, with the model's parameters
        parameters = list(parameters)
        calls.append(1)
        if len(calls) == 3:
            with torch.no_grad():
                for p in parameters:
                    p.fill_(float("nan"))
            signal.raise_signal(signal.SIGINT)
        return clip(parameters, max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", blow_up_then_ctrl_c)
    with pytest.raises(UserError, match=r"the loss became nan at iter 7; .*ckpt.pt keeps the last good checkpoint"):
        run_train(data_dir, out, "--init_from=resume", "--max_iters=100", "--eval_interval=100",
                  "--log_interval=100")
    assert len(calls) == 3 and (out / "ckpt.pt").read_bytes() == good
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # pytest's Ctrl-C works again


def test_ctrl_c_under_ddp_stops_after_the_next_step(data_dir, tmp_path):
    """The processes agree on stopping at every step, not only at progress lines, which may be far apart."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY,
                             "--max_iters=100000000", "--eval_interval=100000000", "--log_interval=100000000"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)  # its own process group, as a terminal's Ctrl-C reaches
    for line in proc.stdout:
        if line.startswith("eval iter 0"):
            break
    time.sleep(2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "interrupted: saved" in err, err[-3000:]
    assert err.count("train.py: interrupted") == 1, err[-3000:]  # rank 0's line, which says what it saved
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] > 0


def test_ctrl_c_stops_eval_only_at_once(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=2", "--eval_interval=2")

    def interrupted_evaluation(*args):
        signal.raise_signal(signal.SIGINT)
        raise AssertionError("Ctrl-C did not stop the evaluation")

    monkeypatch.setattr(train, "estimate_loss", interrupted_evaluation)
    # (a shell starts a background job with SIGINT ignored: Ctrl-C is Python's KeyboardInterrupt here, as in a terminal)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_train(data_dir, out, "--eval_only=True")
    finally:
        signal.signal(signal.SIGINT, previous)


def test_resume_with_another_batch_counts_tokens_and_continues_the_data(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=4")  # 4 steps of 2 x 8 windows of 32 tokens
    firsts = []
    window_starts = train.train_window_starts

    def recorded(seed, first, *args):
        firsts.append(first)
        return window_starts(seed, first, *args)

    monkeypatch.setattr(train, "train_window_starts", recorded)
    run_train(data_dir, out, "--max_iters=6", "--eval_interval=2", "--init_from=resume",
              "--gradient_accumulation_steps=4", "--dropout=0.1")
    assert firsts == [64, 72, 80, 88, 96, 104, 112, 120]  # on from window 4 x 16, 32 windows a step now
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["tokens"] == 4 * 512 + 2 * 1024
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [(r["iter"], r["tokens"]) for r in rows] == [(0, 0), (4, 2048), (6, 4096)]
    # dropout is a training setting: the flag wins on resume, as in nanoGPT, and says so
    assert checkpoint["model_args"]["dropout"] == 0.1
    assert "dropout 0.0 -> 0.1 (--dropout)" in capsys.readouterr().out
