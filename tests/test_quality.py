"""Quality per minute: Muon beside AdamW, the learning-rate schedules, the wall-clock budget, the CPU's dtype."""

import contextlib
import json
import os
import re
import subprocess
import sys

import pytest
import torch

import train
from cli import UserError
from test_train import ROOT, TINY, run_train, straight_and_resumed, tiny_model
from train import TrainConfig, lr_scale

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these models are tiny

def progress_lines(text):
    """(iter, lr) of every progress line a run printed."""
    rows = []
    for line in text.splitlines():
        if line.startswith("iter "):
            fields = line.split(" | ")
            rows.append((int(fields[0].split()[1].split("/")[0]), float(fields[2].split()[1])))
    return rows


# --- optimizers ---------------------------------------------------------------


def test_every_parameter_is_in_exactly_one_optimizer_and_muon_gets_the_blocks_matrices():
    model = tiny_model(bias=True)
    adamw, muon = train.configure_optimizers(model, TrainConfig(optimizer="muon", weight_decay=0.1), "cpu")
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    seen = [id(p) for o in (adamw, muon) for g in o.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))  # (the tied embedding counts once)
    names = {id(p): name for name, p in model.named_parameters()}
    in_muon = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    matrices = {name for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("transformer.h.")}
    assert in_muon == matrices
    assert in_muon >= {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"}
    stacked = {names[i] for i in muon.stacked_qkv}  # orthogonalised as three matrices: query, key, value
    assert stacked == {"transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"}
    decay, no_decay = adamw.param_groups
    assert {names[id(p)] for p in decay["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    # the schedule scales each optimizer's own peak
    train.set_lr([adamw, muon], TrainConfig(learning_rate=1e-3, muon_lr=4e-3), 0.5)
    assert {g["lr"] for g in adamw.param_groups} == {5e-4} and muon.param_groups[0]["lr"] == 2e-3
    train.set_lr([adamw, muon], TrainConfig(learning_rate=1e-3, muon_lr=0.0), 1.0)  # 0: Muon's peak is AdamW's
    assert muon.param_groups[0]["lr"] == 1e-3


def test_adamw_alone_takes_every_parameter():
    model = tiny_model(bias=True)
    (adamw,) = train.configure_optimizers(model, TrainConfig(optimizer="adamw"), "cpu")
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters()))


def test_our_muon_in_bfloat16_is_torch_muon_bit_for_bit():
    """Without stacked_qkv only the Newton-Schulz dtype differs from torch.optim.Muon: in bfloat16 the steps match."""
    torch.manual_seed(0)
    weights = [torch.randn(24, 8), torch.randn(8, 8), torch.randn(8, 32)]
    ours, theirs = [w.clone().requires_grad_() for w in weights], [w.clone().requires_grad_() for w in weights]
    opt_ours = train.Muon(ours, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.bfloat16)
    opt_theirs = torch.optim.Muon(theirs, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert opt_ours.state_dict()["state"].keys() == opt_theirs.state_dict()["state"].keys()


def test_stacked_query_key_value_step_as_three_matrices():
    """c_attn's weight stacks three maps: Muon moves it exactly as it moves the three matrices held apart."""
    torch.manual_seed(0)
    stacked = torch.randn(24, 8, requires_grad=True)
    apart = [t.detach().clone().requires_grad_() for t in stacked.detach().chunk(3)]
    opt_stacked = train.Muon([stacked], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw",
                             ns_dtype=torch.float32, stacked_qkv=[stacked])
    opt_apart = train.Muon(apart, lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    plain = stacked.detach().clone().requires_grad_()
    opt_plain = train.Muon([plain], lr=0.01, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=torch.float32)
    for step in range(3):
        grad = torch.randn(24, 8)
        stacked.grad, plain.grad = grad.clone(), grad.clone()
        for p, g in zip(apart, grad.chunk(3)):
            p.grad = g.clone()
        for opt in (opt_stacked, opt_apart, opt_plain):
            opt.step()
    torch.testing.assert_close(stacked.detach(), torch.cat([p.detach() for p in apart]), rtol=0, atol=1e-6)
    assert not torch.allclose(stacked, plain, atol=1e-4)  # as one 24 x 8 matrix it would have moved otherwise


def test_float32_newton_schulz_orthogonalises():
    torch.manual_seed(0)
    for shape in ((48, 16), (16, 48)):
        g = torch.randn(shape) @ torch.diag(torch.logspace(-1, 1, shape[1]))  # singular values spread 100-fold
        x = train.orthogonalize(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)
        assert x.dtype == torch.float32 and x.shape == g.shape
        singular = torch.linalg.svdvals(x)
        assert singular.min() > 0.5 and singular.max() < 1.3  # near-orthogonal
        in_bfloat16 = train.orthogonalize(g, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.bfloat16)
        assert (x - in_bfloat16).abs().max() < 0.05  # torch's bfloat16 iterations, to bfloat16's precision
        tiny = train.orthogonalize(g * 1e-7, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float16)  # (GPUs without bf16)
        assert (x - tiny).abs().max() < 0.05  # a small gradient's entries are not flushed to zero in float16


def test_newton_schulz_runs_in_float32_on_a_cpu_without_bfloat16_autocast():
    cpu = torch.device("cpu")
    assert train.muon_ns_dtype(cpu, "float32") == torch.float32
    assert train.muon_ns_dtype(cpu, "bfloat16") == torch.bfloat16


@pytest.mark.parametrize("has_bf16, ns_dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_newton_schulz_on_a_gpu_runs_in_bfloat16_where_it_has_it(monkeypatch, has_bf16, ns_dtype):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: has_bf16)
    assert train.muon_ns_dtype(torch.device("cuda"), "float32") == ns_dtype  # V100/T4: float16's tensor cores
    assert train.pick_dtype("auto", torch.device("cuda")) == ("bfloat16" if has_bf16 else "float16")  # training too
    if not has_bf16:
        with pytest.raises(UserError, match="this GPU has no bfloat16: use --dtype=float16"):
            train.pick_dtype("bfloat16", torch.device("cuda"))


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_resume_is_exact_with_each_optimizer_and_wsd(data_dir, tmp_path, optimizer):
    a, b = straight_and_resumed(data_dir, tmp_path, f"--optimizer={optimizer}", "--lr_schedule=wsd",
                                "--decay_frac=0.5")  # (same iters and weights, checked there)
    assert len(a["optimizer"]) == (2 if optimizer == "muon" else 1)  # both optimizers' states are saved
    if optimizer == "muon":
        buffers = [s["momentum_buffer"] for s in b["optimizer"][1]["state"].values()]
        assert buffers and all(t.abs().sum() > 0 for t in buffers)


def test_a_resumed_run_takes_the_learning_rates_and_settings_of_its_flags(data_dir, tmp_path, capsys):
    run_train(data_dir, tmp_path / "out", "--max_iters=2", "--eval_interval=2", "--decay_lr=False")
    capsys.readouterr()
    run_train(data_dir, tmp_path / "out", "--max_iters=4", "--eval_interval=2", "--decay_lr=False",
              "--init_from=resume", "--learning_rate=1e-2", "--muon_lr=2e-2", "--weight_decay=0.3", "--beta1=0.8",
              "--beta2=0.9", "--muon_momentum=0.7")
    assert [lr for _, lr in progress_lines(capsys.readouterr().out)] == [1e-2, 1e-2]
    adamw, muon = torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["optimizer"]
    assert [g["lr"] for g in adamw["param_groups"]] == [1e-2, 1e-2]
    assert [g["lr"] for g in muon["param_groups"]] == [2e-2]
    # not the checkpoint's weight decay 0.1, betas (0.9, 0.95) and momentum 0.95, which the saved state carries
    assert [g["weight_decay"] for g in adamw["param_groups"]] == [0.3, 0.0]
    assert [tuple(g["betas"]) for g in adamw["param_groups"]] == [(0.8, 0.9)] * 2
    assert [(g["weight_decay"], g["momentum"]) for g in muon["param_groups"]] == [(0.3, 0.7)]


def test_resume_with_another_optimizer_is_refused(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "out", "--max_iters=2", "--eval_interval=2", "--optimizer=adamw")
    with pytest.raises(train.UserError, match="trained with --optimizer=adamw: resume with the same"):
        run_train(data_dir, tmp_path / "out", "--max_iters=4", "--init_from=resume", "--optimizer=muon")


def test_muon_learns(data_dir, tmp_path):
    run_train(data_dir, tmp_path / "out", "--max_iters=30", "--eval_interval=30", "--optimizer=muon",
              "--lr_schedule=wsd")
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] - 1.0


def test_bench_quality_runs_each_optimizer_for_the_same_steps(data_dir, tmp_path):
    flags = " ".join([f"--data_dir={data_dir}", *TINY, "--eval_interval=2"])
    bench = subprocess.run([sys.executable, "benchmarks/bench_quality.py", "--recipe=", "--steps=2",
                            f"--out_root={tmp_path}", f"--flags={flags}"], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert bench.returncode == 0, bench.stderr[-2000:]
    table = bench.stdout.split("\ntrain.py defaults, 2 steps")[1].splitlines()[2:]
    assert [row.split()[:2] for row in table] == [["adamw", "2"], ["muon", "2"]]
    for row, optimizer in zip(table, ("adamw", "muon")):  # the figures are those of each run's own log
        last = json.loads((tmp_path / optimizer / "log.jsonl").read_text().splitlines()[-1])
        assert row.split()[2] == f"{last['val_loss']:.4f}"


def test_help_says_which_parameters_each_optimizer_gets():
    from cli import config_help

    line = next(line for line in config_help(TrainConfig).splitlines() if line.strip().startswith("--optimizer="))
    assert "Muon" in line and "matrices" in line and "AdamW" in line and "embeddings" in line


# --- schedules ----------------------------------------------------------------


def test_wsd_warms_up_holds_then_decays_linearly_to_min_lr():
    c = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100, lr_schedule="wsd",
                    decay_frac=0.2)
    lr = [train.get_lr(step, c) for step in range(100)]
    assert lr[0] == pytest.approx(1e-3 / 11)
    assert lr[10:79] == [1e-3] * 69  # stable until the last 20% of the run
    assert lr[89] == pytest.approx(1e-4 + 0.5 * 9e-4)  # (step 89 ends at 90% of the run: halfway down)
    assert lr[99] == pytest.approx(1e-4)  # the last step runs at min_lr
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_schedules_by_progress_end_at_min_lr_even_within_warmup():
    for schedule in ("wsd", "cosine"):
        c = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_minutes=1.0, lr_schedule=schedule)
        assert lr_scale(500, 0.5, c) == pytest.approx(1.0 if schedule == "wsd" else 0.55)
        assert lr_scale(500, 1.0, c) == pytest.approx(0.1)
        assert lr_scale(500, 1.7, c) == pytest.approx(0.1)
        assert lr_scale(5, 1.0, c) <= 0.1  # a budget spent during warmup


def test_decay_lr_false_keeps_the_peak():
    c = TrainConfig(learning_rate=1e-3, decay_lr=False, lr_schedule="wsd")
    assert {train.get_lr(step, c) for step in (0, 50, 4999)} == {1e-3}


# --- wall-clock budget --------------------------------------------------------


@pytest.fixture
def fake_clock(monkeypatch):
    """train.py's clock, advanced 0.1 s at every reading: with --log_interval=1 and no evaluations on the way, each
    step then takes exactly 0.1 s, whatever the machine is doing."""
    import time
    import types

    now = [1000.0]

    def tick():
        now[0] += 0.1
        return now[0]

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=tick, perf_counter=time.perf_counter))


def test_max_minutes_stops_on_time_with_the_last_step_at_min_lr(data_dir, tmp_path, capsys, fake_clock):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_minutes=0.05", "--max_iters=1", "--lr_schedule=wsd", "--decay_frac=0.5",
              "--eval_interval=100000")
    text = capsys.readouterr().out
    steps = progress_lines(text)
    assert 25 <= len(steps) <= 35  # 3 s of 0.1 s steps: the clock, not --max_iters=1, ended it
    lrs = [lr for _, lr in steps]
    assert lrs[-1] == pytest.approx(3e-4)  # the step that ended the run was taken at min_lr
    assert lrs[len(lrs) // 3] == pytest.approx(3e-3)  # the stable phase, at the peak
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # then only down
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == steps[-1][0] == len(steps)
    assert checkpoint["train_s"] == pytest.approx(3.0, abs=0.15)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["iter"] == len(steps)  # it ended with an evaluation and a checkpoint
    # minutes, of the budget, to its places (0.1/0.05 would look like an overrun)
    assert re.search(r"\niter \d+ \(0\.0\d/0\.05 min\) \| loss .* \| eta 0m00s\n", text)


def test_max_minutes_resumes_with_the_time_already_spent(data_dir, tmp_path, fake_clock):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_minutes=0.02", "--eval_interval=100000")
    first = torch.load(out / "ckpt.pt", weights_only=True)
    assert first["train_s"] == pytest.approx(1.2, abs=0.15)
    run_train(data_dir, out, "--max_minutes=0.02", "--eval_interval=100000", "--init_from=resume")
    again = torch.load(out / "ckpt.pt", weights_only=True)
    assert again["iter_num"] == first["iter_num"]  # the budget was already spent: nothing more to train
    run_train(data_dir, out, "--max_minutes=0.04", "--eval_interval=100000", "--init_from=resume")
    more = torch.load(out / "ckpt.pt", weights_only=True)
    assert more["train_s"] == pytest.approx(2.4, abs=0.25)
    assert more["iter_num"] == pytest.approx(2 * first["iter_num"], abs=2)


def test_evaluation_time_is_not_training_time(data_dir, tmp_path, monkeypatch):
    evaluate = train.estimate_loss

    def slow_evaluation(*args, **kwargs):
        import time

        time.sleep(0.6)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(train, "estimate_loss", slow_evaluation)
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_minutes=0.01", "--eval_interval=2")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["elapsed_s"] > checkpoint["train_s"] + 1.2  # two or more 0.6 s evaluations, not counted
    assert checkpoint["train_s"] < 0.6 + 2


@pytest.fixture
def work_clock(monkeypatch):
    """train.py's clock, moved only by the work: each micro-batch of training 0.05 s (TINY's two make a 0.1 s step),
    each evaluation 5 s; reading the clock takes no time, wherever the loop reads it."""
    import time
    import types

    now, costs = [1000.0], {"micro_batch_s": 0.05}  # a test may change the cost as it goes
    windows, evaluate = train.train_window_starts, train.estimate_loss

    def training(*args):
        now[0] += costs["micro_batch_s"]
        return windows(*args)

    def evaluation(*args):
        now[0] += 5.0
        return evaluate(*args)

    monkeypatch.setattr(train, "time", types.SimpleNamespace(time=lambda: now[0], perf_counter=time.perf_counter))
    monkeypatch.setattr(train, "train_window_starts", training)
    monkeypatch.setattr(train, "estimate_loss", evaluation)
    return costs


def test_training_time_counts_every_step_when_evaluations_fall_between_progress_lines(data_dir, tmp_path, work_clock):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=12", "--log_interval=5", "--eval_interval=3")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in rows] == [0, 3, 6, 9, 12]
    assert [row["train_s"] for row in rows] == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.2])
    assert [row["elapsed_s"] for row in rows] == pytest.approx([5.0, 10.3, 15.6, 20.9, 26.2])
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["train_s"] == pytest.approx(1.2)
    run_train(data_dir, tmp_path / "budget", "--max_minutes=0.02", "--log_interval=5", "--eval_interval=3")
    checkpoint = torch.load(tmp_path / "budget" / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == pytest.approx(12, abs=1)  # 1.2 s of 0.1 s steps, evaluations not counted
    assert checkpoint["train_s"] == pytest.approx(1.2, abs=0.1)


def test_an_interrupted_run_saves_the_training_time_up_to_its_last_step(data_dir, tmp_path, monkeypatch, work_clock):
    import signal

    windows, calls = train.train_window_starts, []

    def interrupt_at_the_seventh_step(*args):  # Ctrl-C during step 7: it finishes, saves and stops
        calls.append(1)
        if len(calls) == 13:
            signal.raise_signal(signal.SIGINT)
        return windows(*args)

    monkeypatch.setattr(train, "train_window_starts", interrupt_at_the_seventh_step)  # on top of work_clock's
    with pytest.raises(KeyboardInterrupt):
        run_train(data_dir, tmp_path, "--max_minutes=1", "--log_interval=5", "--eval_interval=100000")
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 7
    assert checkpoint["train_s"] == pytest.approx(0.7)  # not 0.5, the clock at the last progress line


def test_a_long_log_interval_still_stops_on_time_with_the_last_step_at_min_lr(data_dir, tmp_path, capsys,
                                                                              work_clock):
    # the clock is read 1, 2, 4, 8... steps after the start too, not only every log_interval: without those readings
    # the schedule had no time per step, stayed at the peak and trained on to step 1,000
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_minutes=0.019", "--log_interval=1000", "--eval_interval=100000",
              "--lr_schedule=wsd", "--decay_frac=0.5")
    assert progress_lines(capsys.readouterr().out) == [(12, pytest.approx(3e-4))]  # 1.14 s: 12 steps of 0.1 s
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 12 and checkpoint["train_s"] == pytest.approx(1.2)


def test_a_finished_budget_stays_finished_when_its_last_steps_ran_faster(data_dir, tmp_path, monkeypatch,
                                                                         work_clock):
    windows, calls = train.train_window_starts, []

    def faster_after_ten_steps(*args):  # 0.1 s steps (work_clock's), then 0.05 s ones
        calls.append(1)
        work_clock["micro_batch_s"] = 0.05 if len(calls) <= 20 else 0.025
        return windows(*args)

    monkeypatch.setattr(train, "train_window_starts", faster_after_ten_steps)
    out = tmp_path / "out"
    flags = ["--max_minutes=0.019", "--log_interval=5", "--eval_interval=100000"]
    run_train(data_dir, out, *flags)
    first = torch.load(out / "ckpt.pt", weights_only=True)
    # read at step 10 (1.0 s at 0.1 s a step), the clock foresaw the budget's 1.14 s spent after step 12; the
    # faster steps spent 1.1 s. The run is finished all the same: its resume with the same budget trains no more.
    assert first["iter_num"] == 12 and first["train_s"] == pytest.approx(1.1)
    run_train(data_dir, out, "--init_from=resume", *flags)
    again = torch.load(out / "ckpt.pt", weights_only=True)
    assert again["iter_num"] == 12 and again["train_s"] == pytest.approx(1.1)
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in rows] == [0, 12]  # evaluated again at 12: one row, not two
    run_train(data_dir, out, "--init_from=resume", *flags[1:], "--max_minutes=0.032")  # a larger one trains on:
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 12 + 17  # 1.92 s in all, 0.05 s steps


def test_a_resumed_run_keeps_the_log_rows_it_does_not_redo(data_dir, tmp_path):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=5", "--eval_interval=2")
    run_train(data_dir, out, "--max_iters=7", "--eval_interval=2", "--init_from=resume")
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in rows] == [0, 2, 4, 5, 6, 7]  # 5 was the first run's last evaluation
    run_train(data_dir, out, "--max_iters=7", "--eval_interval=2", "--init_from=resume")  # done: evaluates 7 again
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [row["iter"] for row in rows] == [0, 2, 4, 5, 6, 7]


def test_ddp_processes_stop_after_the_same_step_on_a_budget(data_dir, tmp_path):
    """Two gloo processes with Muon and a wall-clock budget: they must agree on the lr and the last step (or hang).
    Only rank 0 evaluates; the other's clock must not run while it waits, or the evaluations eat the budget."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path}/two", *TINY,
                          "--optimizer=muon", "--max_minutes=0.02", "--log_interval=2", "--eval_interval=3",
                          "--eval_tokens=20000"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    steps = progress_lines(ddp.stdout)
    checkpoint = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)
    assert len(steps) >= 2 and checkpoint["iter_num"] == steps[-1][0]  # (a loaded machine may fit only a few steps)
    assert steps[-1][1] == pytest.approx(3e-4)
    assert checkpoint["train_s"] >= 0.9 * 1.2  # about the budget (the last step ends it by extrapolation), all training
    assert checkpoint["elapsed_s"] > checkpoint["train_s"] + 0.5


# --- the CPU's dtype ----------------------------------------------------------


@pytest.mark.parametrize("faster, expected", [(True, "bfloat16"), (False, "float32")])
def test_auto_dtype_on_a_cpu_follows_the_probe(data_dir, tmp_path, monkeypatch, capsys, faster, expected):
    probed = []
    monkeypatch.setattr(train, "cpu_bfloat16_is_faster", lambda *args: probed.append(args) or (faster, "stubbed"))
    assert train.pick_dtype("auto", torch.device("cpu")) is None  # decided once the model exists
    assert train.pick_dtype("float32", torch.device("cpu")) == "float32"  # an explicit dtype is never probed
    run_train(data_dir, tmp_path / "out", "--max_iters=1", "--eval_interval=1", "--dtype=auto")
    out = capsys.readouterr().out
    assert f"dtype auto: {expected} (stubbed)\ndevice cpu, dtype {expected}," in out
    [(model, rows, compiled, resumed)] = probed
    assert isinstance(model, train.GPT) and rows == 8 and not compiled and resumed is None  # TINY's 8 x 32 batch
    assert torch.load(tmp_path / "out" / "ckpt.pt", weights_only=True)["dtype"] == expected


@pytest.fixture
def fast_bfloat16_matmuls(monkeypatch):
    """A CPU whose bf16 matmuls are twice as fast as float32 ones (AMX); speeds[torch.bfloat16] can be lowered."""
    speeds = {torch.bfloat16: 200e9, torch.float32: 100e9}
    monkeypatch.setattr(train, "matmul_flops", lambda dtype, size, repeats=3: speeds[dtype])
    return speeds


def stub_training_passes(monkeypatch, seconds):
    """training_pass_s taking seconds[its dtype]; returns the list of passes asked for: (shape, dtype, chunked)."""
    passes = []

    def timed_pass(model, idx, autocast, chunked_loss):
        dtype = autocast.fast_dtype if isinstance(autocast, torch.autocast) else torch.float32
        passes.append((tuple(idx.shape), dtype, chunked_loss))
        return seconds[dtype]

    monkeypatch.setattr(train, "training_pass_s", timed_pass)
    return passes


def test_bfloat16_probe_times_matmuls_then_the_models_training_passes(monkeypatch, fast_bfloat16_matmuls):
    seconds = {torch.bfloat16: 0.5, torch.float32: 1.0}
    passes = stub_training_passes(monkeypatch, seconds)
    model = tiny_model()
    faster, measured = train.cpu_bfloat16_is_faster(model, 4)
    assert faster and measured == "a training pass of 4 x 16 tokens took 500 ms in bfloat16 against 1000 ms in float32"
    assert passes == [((4, 16), torch.bfloat16, False), ((4, 16), torch.float32, True)]  # each with its own loss
    seconds[torch.bfloat16] = 0.95  # a close call keeps float32
    assert not train.cpu_bfloat16_is_faster(model, 4)[0]
    passes.clear()
    assert not train.cpu_bfloat16_is_faster(model, 4, compile_model=True)[0] and not passes[1][2]  # compiled: no chunks
    passes.clear()  # a resume keeps its run's dtype without timing anything
    assert train.cpu_bfloat16_is_faster(model, 4, resumed_dtype="bfloat16")[0]
    assert not train.cpu_bfloat16_is_faster(model, 4, resumed_dtype="float32")[0] and not passes
    fast_bfloat16_matmuls[torch.bfloat16] = 120e9  # 1.2x float32's: under the 1.25x the passes would need, none timed
    assert train.cpu_bfloat16_is_faster(model, 4) == (False, "bfloat16 matmuls ran at 120.0 GFLOP/s against 100.0 in "
                                                              "float32") and not passes
    fast_bfloat16_matmuls[torch.bfloat16] = 1e9  # emulated bf16, as on CPUs without bf16 arithmetic: no pass to time
    faster, measured = train.cpu_bfloat16_is_faster(model, 4, resumed_dtype="bfloat16")
    assert not faster and measured == "bfloat16 matmuls ran at 1.0 GFLOP/s against 100.0 in float32" and not passes


def linear_output_dtypes(run):
    """The dtype of every Linear module's output while run() runs."""
    dtypes = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: dtypes.append(output.dtype) if isinstance(module, torch.nn.Linear) else None)
    try:
        run()
    finally:
        hook.remove()
    return dtypes


def test_a_timed_training_pass_leaves_the_model_and_the_rng_as_they_were():
    model = tiny_model(dropout=0.1)  # dropout draws from the RNG
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng, seconds = torch.get_rng_state(), []
    idx = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(0))
    bf16 = linear_output_dtypes(lambda: seconds.append(train.training_pass_s(
        model, idx, torch.autocast("cpu", dtype=torch.bfloat16), chunked_loss=False)))
    assert 0 < seconds[0] < 10
    # timed in bf16, not just called so: a warm-up and two timed passes of 2 blocks' 4 Linears and the head
    assert bf16 == [torch.bfloat16] * 3 * (2 * 4 + 1)
    fp32 = linear_output_dtypes(lambda: train.training_pass_s(model, idx, contextlib.nullcontext(), chunked_loss=True))
    assert fp32 == [torch.float32] * 3 * 2 * 4  # the chunked loss, which never calls lm_head as a module
    assert not model.chunked_loss  # left as it was
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_a_resumed_run_keeps_the_dtype_it_was_trained_in(data_dir, tmp_path, monkeypatch, capsys,
                                                       fast_bfloat16_matmuls):
    seconds = {torch.bfloat16: 0.5, torch.float32: 1.0}
    stub_training_passes(monkeypatch, seconds)
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=2", "--eval_interval=2", "--dtype=auto")
    assert torch.load(out / "ckpt.pt", weights_only=True)["dtype"] == "bfloat16"
    seconds[torch.bfloat16] = 2.0  # timed again now, bf16 would lose; the resumed run stays in bf16 all the same
    capsys.readouterr()
    run_train(data_dir, out, "--max_iters=4", "--eval_interval=2", "--dtype=auto", "--init_from=resume")
    assert "dtype auto: bfloat16 (the dtype of the run being resumed)" in capsys.readouterr().out
    assert torch.load(out / "ckpt.pt", weights_only=True)["dtype"] == "bfloat16"


def test_eval_only_times_no_training_passes(data_dir, tmp_path, monkeypatch, capsys, fast_bfloat16_matmuls):
    out = tmp_path / "out"
    run_train(data_dir, out, "--max_iters=2", "--eval_interval=2", "--dtype=float32")
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    del checkpoint["dtype"]  # as saved before the choice was kept
    torch.save(checkpoint, out / "ckpt.pt")
    monkeypatch.setattr(train, "training_pass_s", lambda *args, **kwargs: pytest.fail("timed a training pass"))
    capsys.readouterr()
    run_train(data_dir, out, "--init_from=resume", "--eval_only=True", "--dtype=auto")
    assert "device cpu, dtype float32," in capsys.readouterr().out


@pytest.mark.parametrize("name, dtype, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12), ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H100 NVL", "float16", 835e12), ("NVIDIA H200", "float32", 495e12), ("NVIDIA L40", "bfloat16", 181e12),
    ("NVIDIA L40S", "bfloat16", 362e12), ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA A100-SXM4-80GB", "float32", 156e12), ("Tesla V100-SXM2-16GB", "float32", 16e12),
    ("Tesla T4", "float16", 65e12),
    ("NVIDIA GeForce RTX 3090", "bfloat16", 71e12), ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "bfloat16", 0.0),
    ("NVIDIA H200 NVL", "bfloat16", 835e12), ("NVIDIA GH200 480GB", "bfloat16", 989e12),
    ("NVIDIA A10G", "bfloat16", 0.0), ("NVIDIA RTX A1000", "bfloat16", 0.0), ("Some Future GPU", "bfloat16", 0.0)])
def test_gpu_peak_flops_by_name_longest_match_first(monkeypatch, name, dtype, peak):
    # "L40" must not read as "L4", "A1000" as "A10", nor "H100 PCIe" as the SXM part; a MIG slice or a GPU not in the
    # table has no peak (no MFU)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert train.peak_flops_of(torch.device("cuda"), dtype) == peak


def test_mfu_peak_is_measured_in_the_dtype_used(monkeypatch):
    speeds, probes = {torch.bfloat16: 200e9, torch.float32: 100e9}, []  # AMX: bf16 twice float32
    monkeypatch.setattr(train, "matmul_flops", lambda dtype, size, repeats=3: probes.append(size) or speeds[dtype])
    assert train.peak_flops_of(torch.device("cpu"), "bfloat16") == 200e9
    assert train.peak_flops_of(torch.device("cpu"), "float32") == 100e9
    speeds[torch.bfloat16], probes[:] = 1e9, []  # emulated bf16: the hardware's peak is still float32's (MFU < 100%)
    assert train.peak_flops_of(torch.device("cpu"), "bfloat16") == 100e9
    assert 1024 not in probes  # a large emulated probe would take 12 s
