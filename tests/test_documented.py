"""
Documented behaviour, each test built to fail if the behaviour it names regressed: the chunked LM-head loss over
several chunks, --eval_only writing nothing, --always_save_checkpoint, --grad_clip, --decay_lr, the CPU recipe,
prepare's --dtype=auto, DDP logging and the device default for --compile.
"""

import ast
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_pre_hook

import prepare
import train
from cli import parse_config
from test_sample import write_stories
from test_train import ROOT, TINY, files_with_mtimes, run_train
from train import ChunkedLMHeadLoss, TrainConfig

FAST = "--peak_flops=1e12"  # skips measuring the CPU's matmul speed for MFU: a second or two per run
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models, a busy machine


# --- the chunked LM-head loss -------------------------------------------------


def chunked_and_plain_loss(x, weight, targets, upstream=1.0):
    """(loss, grad_x, grad_weight) of ChunkedLMHeadLoss in 256-row blocks, then of F.cross_entropy."""
    results = []
    for chunked in (True, False):
        x_, w_ = x.clone().requires_grad_(), weight.clone().requires_grad_()
        if chunked:
            loss = ChunkedLMHeadLoss.apply(x_, w_, targets, 256)
        else:
            loss = F.cross_entropy(x_ @ w_.T, targets)
        (loss * upstream).backward()
        results.append((loss.item(), x_.grad, w_.grad))
    return results


@pytest.mark.parametrize("rows", [3 * 256 + 37, 4 * 256])  # a ragged last chunk, and whole chunks only
def test_chunked_lm_head_loss_over_several_chunks_is_cross_entropy(rows):
    """Loss, grad_x and grad_weight summed over chunks and scaled by 1/rows, in float64 against F.cross_entropy."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 24, dtype=torch.float64, generator=generator)
    weight = torch.randn(100, 24, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, 100, (rows,), generator=generator)
    upstream = 0.25  # the gradient from above (1/grad_accum in train.py) scales both; exact in the float32 loss
    (loss_c, gx_c, gw_c), (loss_f, gx_f, gw_f) = chunked_and_plain_loss(x, weight, targets, upstream)
    assert loss_c == pytest.approx(loss_f, rel=1e-6)  # (the chunked sum is kept in float32)
    assert torch.allclose(gx_c, gx_f, rtol=0, atol=1e-12)
    assert torch.allclose(gw_c, gw_f, rtol=0, atol=1e-12)


def test_chunked_lm_head_loss_of_an_underflowing_target_is_capped_and_its_gradient_exact():
    """A target whose float32 probability underflows to 0 counts as -log(float32 tiny) = 87.3 nats, not inf."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weight = torch.tensor([[200.0, 0.0], [0.0, 0.0]])  # row 0: the target's logit is 200 below the other
    targets = torch.tensor([1, 0])
    (loss_c, gx_c, gw_c), (loss_f, gx_f, gw_f) = chunked_and_plain_loss(x, weight, targets)
    capped = -math.log(torch.finfo(torch.float32).tiny)
    assert loss_f == pytest.approx((200.0 + math.log(2.0)) / 2)  # row 1: both logits 0
    assert loss_c == pytest.approx((capped + math.log(2.0)) / 2)
    assert torch.allclose(gx_c, gx_f) and torch.allclose(gw_c, gw_f)


# --- --eval_only with a bpe:N tokenizer ----------------------------------------------------


def test_eval_only_leaves_the_runs_tokenizer_untouched(tmp_path):
    """train.py copies tokenizer.json into out_dir for sample.py; evaluating must not write it (or anything) again."""
    write_stories(tmp_path / "train.txt", 200, seed=0)
    write_stories(tmp_path / "val.txt", 40, seed=1)
    data, out = tmp_path / "data", tmp_path / "out"
    prepare.main([f"--train_files={tmp_path / 'train.txt'}", f"--val_files={tmp_path / 'val.txt'}",
                  "--tokenizer=bpe:300", f"--data_dir={data}", f"--cache_dir={tmp_path / 'hf-cache'}"])
    run_train(str(data), out, "--max_iters=1", "--eval_interval=1", FAST)
    before = files_with_mtimes(out)
    assert {"ckpt.pt", "log.jsonl", "tokenizer.json"} <= set(before)
    run_train(str(data), out, "--eval_only=True", FAST)
    assert files_with_mtimes(out) == before


# --- checkpoints, clipping, schedule ----------------------------------------------------------


def log_rows(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_always_save_checkpoint_false_keeps_the_best_val_loss(data_dir, tmp_path):
    out = tmp_path / "out"
    best_only = ["--eval_interval=2", "--always_save_checkpoint=False", "--optimizer=adamw", FAST]  # (Muon shrugs
    # off the learning rate that makes AdamW's val loss worse below)
    run_train(data_dir, out, "--max_iters=4", *best_only)
    val = [r["val_loss"] for r in log_rows(out)]
    assert val[2] < val[1] < val[0]  # improving: saved at iters 2 and 4
    assert torch.load(out / "ckpt.pt", weights_only=True)["iter_num"] == 4
    best = (out / "ckpt.pt").read_bytes()
    # a learning rate far too high makes the val loss worse at iters 6 and 8: the checkpoint of iter 4 stays
    too_high = ["--learning_rate=0.3", "--min_lr=0.3", "--init_from=resume", "--max_iters=8"]
    run_train(data_dir, out, *too_high, *best_only)
    assert [r["iter"] for r in log_rows(out)] == [0, 2, 4, 6, 8]
    assert min(r["val_loss"] for r in log_rows(out)[3:]) > val[2]
    assert (out / "ckpt.pt").read_bytes() == best
    # the same steps with the default, True, save at every evaluation
    run_train(data_dir, out, *too_high, "--eval_interval=2", "--optimizer=adamw", FAST)
    checkpoint = torch.load(out / "ckpt.pt", weights_only=True)
    assert checkpoint["iter_num"] == 8
    # it still records the best val loss, not the last: a later resume with False must not save over a better one
    assert checkpoint["best_val_loss"] == min(r["val_loss"] for r in log_rows(out)) == val[2]


def optimizer_steps(data_dir, out, *flags):
    """Train; for each optimizer step, the gradient norm and the learning rate the optimizer saw."""
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if getattr(optimizer, "grad_scale", None) is not None:  # float16: GradScaler lets fused AdamW unscale inside
            norm /= optimizer.grad_scale.item()
        seen.append((norm, [group["lr"] for group in optimizer.param_groups]))

    hook = register_optimizer_step_pre_hook(record)  # every optimizer, before each step
    try:
        run_train(data_dir, out, "--optimizer=adamw", *flags, FAST)  # one optimizer: one call per step
    finally:
        hook.remove()
    return seen


def test_grad_clip_caps_the_gradient_norm_and_zero_turns_it_off(data_dir, tmp_path):
    steps = ["--max_iters=3", "--eval_interval=3"]
    off = [norm for norm, _ in optimizer_steps(data_dir, tmp_path / "off", *steps, "--grad_clip=0")]
    huge = [norm for norm, _ in optimizer_steps(data_dir, tmp_path / "huge", *steps, "--grad_clip=1e9")]
    assert len(off) == 3 and off == huge  # 0 is no clipping at all (not a clip to 0)
    limit = min(off) / 2
    clipped = [norm for norm, _ in optimizer_steps(data_dir, tmp_path / "clipped", *steps, f"--grad_clip={limit}")]
    assert clipped == pytest.approx([limit] * 3, rel=1e-4)
    # float16's loss scaling: the gradients are unscaled before they are clipped, not clipped at 65,536 times their size
    scaled = optimizer_steps(data_dir, tmp_path / "fp16", *steps, f"--grad_clip={limit}", "--dtype=float16")
    assert [norm for norm, _ in scaled] == pytest.approx([limit] * len(scaled), rel=1e-4) and scaled


def test_decay_lr_false_keeps_the_learning_rate_constant(data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    # warmup_iters=2 and min_lr=3e-4 (in TINY) would move it if they applied
    steps = optimizer_steps(data_dir, out, "--max_iters=6", "--eval_interval=3", "--decay_lr=False",
                            "--learning_rate=3e-3")
    assert [lrs for _, lrs in steps] == [[3e-3, 3e-3]] * 6
    assert [r["lr"] for r in log_rows(out)] == [3e-3] * 3
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("iter ")]
    assert len(progress) == 6 and all("| lr 3.00e-03 |" in line for line in progress)


# --- the shipped recipe, prepare's dtype --------------------------------------------------------


def test_the_cpu_recipe_parses_and_validates():
    path = os.path.join(ROOT, "configs", "tinystories_cpu.py")
    config = parse_config(TrainConfig, [path])  # an unknown key or a value of the wrong type raises here
    train.validate(config)
    assert config != TrainConfig() and config.device == "cpu" and str(config.compile).lower() == "false"
    assert train.micro_steps_per_process(config, config.block_size, 1) == 1  # "one micro-step of 16 x 256"
    assert config.max_minutes and config.optimizer == "muon" and config.lr_schedule == "wsd"  # a budget, fitted
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    # the commands in its docstring make the data it reads and sample the run it writes
    assert f"--data_dir={config.data_dir}" in doc and f"--out_dir={config.out_dir}" in doc


@pytest.mark.parametrize("tokenizer, vocab_size, dtype", [
    ("gpt2", 50257, "uint16"), ("bpe:65536", 65536, "uint16"), ("bpe:65537", 65537, "uint32"),
    ("bpe:100000", 100000, "uint32"),
])
def test_prepare_dtype_auto_is_uint32_only_when_ids_pass_65535(tokenizer, vocab_size, dtype):
    config = prepare.PrepareConfig(tokenizer=tokenizer, dtype="auto")
    assert prepare.check_tokenizer(config) == (vocab_size, dtype)
    assert prepare.check_tokenizer(prepare.PrepareConfig(tokenizer=tokenizer, dtype="uint32"))[1] == "uint32"


# --- DDP and devices ------------------------------------------------------------------------------


def test_ddp_rank_0_alone_writes_the_log_and_prints(data_dir, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--max_iters=4",
                          "--eval_interval=2", FAST], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es)" in ddp.stdout
    assert [r["iter"] for r in log_rows(out)] == [0, 2, 4]  # one row per evaluation, not one per process
    lines = ddp.stdout.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("eval iter")] == \
        ["eval iter 0", "eval iter 2", "eval iter 4"]
    assert [line.split(" |")[0] for line in lines if line.startswith("iter ")] == [f"iter {i}/4" for i in range(1, 5)]


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
def test_compile_auto_is_on_for_cuda_only(data_dir, tmp_path, capsys, device):
    from torch._dynamo.utils import counters

    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available[device]:
        pytest.skip(f"no {device} here")
    torch._dynamo.reset()
    counters.clear()
    try:
        run_train(data_dir, tmp_path / "out", "--max_iters=1", "--eval_interval=1", f"--device={device}",
                  "--compile=auto")
        graphs = counters["stats"]["unique_graphs"]  # what dynamo compiled, whatever was printed
    finally:
        torch._dynamo.reset()
    printed = capsys.readouterr().out
    if device == "cuda":
        from torch.utils._triton import has_triton

        compiled = has_triton()  # without Triton, auto falls back to eager with a note
        assert compiled or "torch.compile is not available here (no Triton)" in printed
    else:
        compiled = False
    assert f"compile {compiled}," in printed
    assert (graphs > 0) == compiled
