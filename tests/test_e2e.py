"""The whole pipeline as a user runs it: prepare.py, train.py (and a resume), sample.py, through their command lines."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAMES = ["Lily", "Tom", "Ben", "Mia", "Sam", "Anna"]
THINGS = ["ball", "kite", "red car", "little boat", "big box", "toy bear"]
PLACES = ["park", "garden", "beach", "forest", "yard"]


def write_corpus(path, n_stories, seed):
    """TinyStories' official .txt format: paragraphs on their own lines, a line of <|endoftext|> after each story."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n_stories):
        name, thing, place = rng.choice(NAMES), rng.choice(THINGS), rng.choice(PLACES)
        stories.append(
            f"Once upon a time, there was a little girl named {name}. {name} loved to play in the {place}.\n"
            f"One day, {name} found a {thing} in the {place}. \"Look, a {thing}!\" said {name}.\n"
            f"{name} played with the {thing} all day. {name} was very happy.")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(story + "\n<|endoftext|>\n" for story in stories))


def run(script, *args):
    result = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, f"{script} {' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout


@pytest.mark.parametrize("tokenizer", ["gpt2", "bpe:512"])
def test_prepare_train_resume_sample(tmp_path, tokenizer):
    write_corpus(tmp_path / "train.txt", 400, seed=1)
    write_corpus(tmp_path / "valid.txt", 60, seed=2)
    data, out = str(tmp_path / "data"), str(tmp_path / "out")

    run("prepare.py", f"--train_files={tmp_path}/train.txt", f"--val_files={tmp_path}/valid.txt",
        f"--tokenizer={tokenizer}", f"--data_dir={data}")
    meta = json.loads(open(os.path.join(data, "meta.json")).read())
    assert meta["train"]["stories"] == 400 and meta["val"]["stories"] == 60

    model = ["--n_layer=2", "--n_head=2", "--n_embd=48", "--block_size=64", "--batch_size=8",
             "--gradient_accumulation_steps=1", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=5",
             "--lr_decay_iters=60", "--eval_tokens=2048", "--eval_interval=20", "--log_interval=10", "--device=cpu"]
    run("train.py", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=40", *model)
    log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert log[-1]["iter"] == 40 and log[-1]["val_loss"] < log[0]["val_loss"] - 1.0
    for name in ("log.jsonl", "loss.png", "ckpt.pt"):
        assert os.path.getsize(os.path.join(out, name)) > 0

    printed = run("train.py", f"--data_dir={data}", f"--out_dir={out}", "--max_iters=60", "--init_from=resume",
                  *model)
    assert "resuming from" in printed and "iter 60/60" in printed
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["iter_num"] == 60
    assert [row["iter"] for row in map(json.loads, open(os.path.join(out, "log.jsonl")))] == [0, 20, 40, 60]

    text = run("sample.py", "--prompt", "Once upon a time", f"--out_dir={out}", "--num_samples=1",
               "--max_new_tokens=30", "--device=cpu", "--temperature=0")
    # the trained model's own greedy continuation, generated in-process from the same out_dir
    story = sample.generate_text(*sample.load_model(out, device="cpu"), "Once upon a time", max_new_tokens=30,
                                 temperature=0)[0]
    assert len(story) > 10
    assert text == f"Once upon a time{story}\n{'-' * 15}\n"
