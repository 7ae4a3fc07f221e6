"""What nanoGPT users type: bare boolean flags, nanoGPT's names for settings, and Weights & Biases logging."""

import dataclasses
import glob
import json
import os
import struct
import sys
import time

import pytest
import torch

import cli
import export
import prepare
import sample
import train
from cli import UserError, parse_config
from test_train import TINY, make_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these models are tiny


def one_line_error(capsys, main, *flags):
    """main's UserError must become one line on stderr and exit code 2; the line is returned."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(main, list(flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -----------------------------------------------------------------------------
# bare boolean flags


@pytest.mark.parametrize("config_cls, nanogpt_flags", [
    (prepare.PrepareConfig, None),
    (train.TrainConfig, train.NANOGPT_FLAGS),
    (sample.SampleConfig, sample.NANOGPT_FLAGS),
])
def test_a_bare_flag_means_true_for_every_bool_setting_and_takes_no_value(config_cls, nanogpt_flags):
    fields = dataclasses.fields(config_cls)
    bools = [f.name for f in fields if f.type is bool]
    assert bools  # prepare: force, fix_mojibake; train: eval_only, plot, ...; sample: compile, kv_cache, ...
    word_field = next(f.name for f in fields if f.type is str)
    for name in bools:
        # the next argument is a flag of its own, not this one's value
        config = parse_config(config_cls, [f"--{name}", f"--{word_field}", "x"], "", nanogpt_flags)
        assert getattr(config, name) is True and getattr(config, word_field) == "x"
        assert getattr(parse_config(config_cls, [f"--{name}=False"], "", nanogpt_flags), name) is False
        assert getattr(parse_config(config_cls, [f"--{name}"], "", nanogpt_flags), name) is True  # the last argument
        for word, value in (("False", False), ("true", True), ("0", False)):  # `--key value` as before
            config = parse_config(config_cls, [f"--{name}", word, f"--{word_field}=y"], "", nanogpt_flags)
            assert getattr(config, name) is value and getattr(config, word_field) == "y"


def test_a_bare_flag_for_a_setting_that_is_not_bool_still_needs_its_value(capsys):
    assert parse_config(export.ExportConfig, ["--hf_dir", "hf", "--out_dir=run"]) == \
        export.ExportConfig(out_dir="run", hf_dir="hf")
    assert "--hf_dir needs a value" in one_line_error(capsys, export.main, "--hf_dir")
    assert "--hf_dir needs a value" in one_line_error(capsys, export.main, "--hf_dir", "--out_dir=run")
    assert "unknown setting 'force'" in one_line_error(capsys, export.main, "--force")  # not a bool of export's
    assert "--max_iters needs a value" in one_line_error(capsys, train.main, "--max_iters", "--eval_only")


def test_another_scripts_config_file_or_setting_is_named_as_such(tmp_path, capsys):
    recipe = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "tinystories_cpu.py")
    for main, script in ((sample.main, "sample.py"), (export.main, "export.py")):
        assert one_line_error(capsys, main, recipe).endswith(
            f": error: {recipe} is a config file for train.py ('data_dir' is its setting), not for {script}; "
            "to use its run, give --out_dir=out-cpu\n")
    assert f"{recipe} is a config file for train.py ('out_dir' is its setting), not for prepare.py (see --help)" in \
        one_line_error(capsys, prepare.main, recipe)
    nanogpt = tmp_path / "train_shakespeare_char.py"  # a nanoGPT name first, not one of train.py's fields
    nanogpt.write_text("out_dir = 'out-shakespeare-char'\ndataset = 'shakespeare_char'\neval_interval = 250\n")
    assert f"is a config file for train.py ('eval_interval' is its setting), not for sample.py; to use its run, give " \
        "--out_dir=out-shakespeare-char" in one_line_error(capsys, sample.main, str(nanogpt))
    assert "unknown setting 'temperature' in the command line ('temperature' is a setting of sample.py; see --help)" \
        in one_line_error(capsys, train.main, "--temperature=0.8")
    data = tmp_path / "data_config.py"  # prepare.py's settings, one of them (data_dir) train.py's too
    data.write_text("data_dir = 'data/mine'\ntrain_files = 'stories.txt'\ntokenizer = 'bpe:4096'\n")
    assert f"{data} is a config file for prepare.py ('data_dir' is its setting), not for sample.py (see --help)" in \
        one_line_error(capsys, sample.main, str(data))
    typo = tmp_path / "typo.py"  # a key no script takes is still a typo
    typo.write_text("out_dir = 'x'\ntemprature = 0.8\n")
    assert "unknown setting 'temprature' in" in one_line_error(capsys, sample.main, str(typo))


def test_bare_compile_means_true_in_train_where_it_also_takes_auto(tmp_path):
    def parse(*flags):
        return parse_config(train.TrainConfig, list(flags), "", train.NANOGPT_FLAGS).compile

    assert parse() == "auto" and parse("--compile=auto") == "auto"
    assert parse("--compile") is True and parse("--compile", "--eval_only") is True
    assert parse("--compile=False") is False and parse("--compile=True") is True
    assert parse("--compile", "False") is False and parse("--compile", "auto") == "auto"
    recipe = tmp_path / "recipe.py"
    recipe.write_text("n_layer = 3\n")
    assert parse("--compile", str(recipe)) is True  # a config file after it is a config file
    assert parse_config(train.TrainConfig, ["--compile", str(recipe)]).n_layer == 3


def test_prepare_force_alone_rebuilds(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("A story.\n<|endoftext|>\nAnother one.\n<|endoftext|>\n")
    (tmp_path / "val.txt").write_text("Val story.\n<|endoftext|>\n")
    flags = [f"--data_dir={tmp_path / 'out'}", f"--train_files={tmp_path / 'train.txt'}",
             f"--val_files={tmp_path / 'val.txt'}"]
    prepare.main(flags)
    prepare.main(flags)
    assert "is up to date" in capsys.readouterr().out
    prepare.main(["--force", *flags])
    assert "is up to date" not in capsys.readouterr().out


def test_train_eval_only_alone_evaluates_the_checkpoint(data_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    flags = [f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--peak_flops=1e12"]
    train.main([*flags, "--max_iters=2", "--eval_interval=2"])
    capsys.readouterr()
    train.main([*flags, "--eval_only", "--max_iters=4"])
    printed = capsys.readouterr().out
    assert "resuming from" in printed and "eval iter 2:" in printed and "iter 3" not in printed


# -----------------------------------------------------------------------------
# nanoGPT's names: train.py


def train_config(*flags):
    return parse_config(train.TrainConfig, list(flags), "", train.NANOGPT_FLAGS)


def test_eval_iters_becomes_eval_tokens_with_the_final_batch_and_block_size(capsys):
    for flags in (["--eval_iters=3", "--batch_size=4", "--block_size=16"],
                  ["--batch_size=4", "--eval_iters=3", "--block_size=16"],
                  ["--block_size=16", "--batch_size=4", "--eval_iters=3"]):
        assert train_config(*flags).eval_tokens == 3 * 4 * 16
    assert capsys.readouterr().err.splitlines() == \
        ["note: --eval_iters=3 became --eval_tokens=192 (3 batches of 4 x 16 tokens)"] * 3
    assert train_config("--eval_iters=2").eval_tokens == 2 * 64 * 512  # the defaults
    # as any setting given twice, the later one wins
    assert train_config("--eval_iters=3", "--eval_tokens=100").eval_tokens == 100
    assert train_config("--eval_tokens=100", "--eval_iters=3").eval_tokens == 3 * 64 * 512
    with pytest.raises(UserError, match="--eval_iters must be at least 1, got 0"):
        train_config("--eval_iters=0")
    with pytest.raises(UserError, match="--eval_iters must be int, got 'many'"):
        train_config("--eval_iters=many")


def test_dataset_becomes_data_dir(capsys):
    assert train_config("--dataset=shakespeare_char").data_dir == os.path.join("data", "shakespeare_char")
    assert capsys.readouterr().err == f"note: --dataset=shakespeare_char became --data_dir=" \
                                      f"{os.path.join('data', 'shakespeare_char')}\n"
    assert train_config("--dataset=a", "--data_dir=b").data_dir == "b"


def test_init_from(capsys):
    assert train_config("--init_from=resume").init_from == "resume"
    assert train_config("--init_from=scratch").init_from == "scratch"
    assert capsys.readouterr().err == ""  # the same as nanoGPT's: nothing to say
    for name in ("gpt2", "gpt2-xl"):
        err = one_line_error(capsys, train.main, f"--init_from={name}")
        assert f"--init_from={name}: OpenAI's GPT-2 weights are not loaded here" in err
        assert "--init_from=scratch" in err and "--init_from=resume" in err
    assert "--init_from must be 'scratch' or 'resume'" in one_line_error(capsys, train.main, "--init_from=other")


def test_backend_is_chosen_here_so_it_is_only_a_note(capsys):
    assert train_config("--backend=nccl") == train.TrainConfig()
    assert capsys.readouterr().err == \
        "note: --backend=nccl is not needed: under torchrun train.py picks nccl on GPUs and gloo on CPUs\n"


# Every other global of nanoGPT's train.py, with a value of its type: the same name means the same setting here.
NANOGPT_TRAIN_SAME = dict(
    out_dir="out-x", eval_interval=250, log_interval=5, eval_only=True, always_save_checkpoint=False, wandb_log=True,
    wandb_project="owt", wandb_run_name="gpt2-124M", gradient_accumulation_steps=40, batch_size=12, block_size=256,
    n_layer=6, n_head=6, n_embd=384, dropout=0.2, bias=True, learning_rate=6e-4, max_iters=600, weight_decay=0.1,
    beta1=0.85, beta2=0.99, grad_clip=0.5, decay_lr=False, warmup_iters=100, lr_decay_iters=600, min_lr=6e-5,
    device="cpu", dtype="bfloat16", compile=False,
)


@pytest.mark.parametrize("name, value", NANOGPT_TRAIN_SAME.items())
def test_every_other_nanogpt_train_flag_means_the_same_here(name, value, capsys):
    assert getattr(train_config(f"--{name}={value}"), name) == value
    assert capsys.readouterr().err == ""


def test_a_nanogpt_config_file_is_translated_too(tmp_path, capsys):
    """nanoGPT's config/train_shakespeare_char.py, as it is, with the dataset renamed."""
    recipe = tmp_path / "train_shakespeare_char.py"
    recipe.write_text("""# train a miniature character-level shakespeare model
out_dir = 'out-shakespeare-char'
eval_interval = 250 # keep frequent because we'll overfit
eval_iters = 200
log_interval = 10 # don't print too too often

# we expect to overfit on this small dataset, so only save when val improves
always_save_checkpoint = False

wandb_log = False # override via command line if you like
wandb_project = 'shakespeare-char'
wandb_run_name = 'mini-gpt'

dataset = 'shakespeare_char'
gradient_accumulation_steps = 1
batch_size = 64
block_size = 256 # context of up to 256 previous characters

# baby GPT model :)
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3 # with baby networks can afford to go a bit higher
max_iters = 5000
lr_decay_iters = 5000 # make equal to max_iters usually
min_lr = 1e-4 # learning_rate / 10 usually
beta2 = 0.99 # make a bit bigger because number of tokens per iter is small

warmup_iters = 100 # not super necessary potentially

# on macbook also add
# device = 'cpu'  # run on cpu only
# compile = False # do not torch compile the model
""")
    config = train_config(str(recipe), "--device=cpu", "--compile=False", "--block_size=128")
    assert config.eval_tokens == 200 * 64 * 128  # the block size in effect, given after the file
    assert config.data_dir == os.path.join("data", "shakespeare_char")
    assert (config.out_dir, config.always_save_checkpoint, config.wandb_project, config.n_layer, config.dropout,
            config.beta2, config.compile) == ("out-shakespeare-char", False, "shakespeare-char", 6, 0.2, 0.99, False)
    assert capsys.readouterr().err.count("note: ") == 2


def test_nanogpt_config_files_may_do_arithmetic_on_numbers(tmp_path, capsys):
    """nanoGPT's config/train_gpt2.py (its wandb_log too), whose values include `5 * 8`; its files are Python."""
    recipe = tmp_path / "train_gpt2.py"
    recipe.write_text("""wandb_log = True
wandb_project = 'owt'
wandb_run_name='gpt2-124M'

# these make the total batch size be ~0.5M
# 12 batch size * 1024 block size * 5 gradaccum * 8 GPUs = 491,520
batch_size = 12
block_size = 1024
gradient_accumulation_steps = 5 * 8

# this makes total number of tokens be 300B
max_iters = 600000
lr_decay_iters = 600000

# eval stuff
eval_interval = 1000
eval_iters = 200
log_interval = 10

# weight decay
weight_decay = 1e-1
min_lr = 6e-4 / 10
""")
    config = train_config(str(recipe))
    assert (config.gradient_accumulation_steps, config.min_lr, config.eval_tokens, config.wandb_log,
            config.wandb_run_name) == (40, pytest.approx(6e-5), 200 * 12 * 1024, True, "gpt2-124M")
    for bad in ("'a' * 3", "True + 1", "1 / 0", "n_layer * 2"):
        recipe.write_text(f"n_layer = {bad}\n")
        with pytest.raises(UserError, match="line 1: the value must be a literal, or arithmetic on numbers"):
            train_config(str(recipe))


def test_a_run_with_nanogpt_flags_reads_data_dataset_and_evaluates_eval_iters_batches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    os.makedirs("data/counting")
    make_dataset("data/counting")
    flags = [f for f in TINY if not f.startswith("--eval_tokens=")]
    train.main(["--dataset=counting", "--eval_iters=2", "--out_dir=out", "--max_iters=2", "--eval_interval=2",
                "--backend=gloo", "--peak_flops=1e12", *flags])
    with open("out/log.jsonl") as f:
        assert [json.loads(line)["iter"] for line in f] == [0, 2]
    config = train.load_checkpoint("out/ckpt.pt")["config"]
    assert config["data_dir"] == os.path.join("data", "counting") and config["eval_tokens"] == 2 * 8 * 32
    assert capsys.readouterr().err.count("note: ") == 3


# -----------------------------------------------------------------------------
# nanoGPT's names: sample.py


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """A tiny untrained model with GPT-2's tokenizer, saved as train.py saves it."""
    out_dir = str(tmp_path_factory.mktemp("out"))
    torch.manual_seed(0)
    model_args = dict(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=False)
    meta = {"tokenizer": "gpt2", "tokenizer_file": None, "vocab_size": 50257, "eot_token": 50256, "dtype": "uint16"}
    checkpoint = {"version": train.CHECKPOINT_VERSION, "model": train.GPT(train.GPTConfig(**model_args)).state_dict(),
                  "model_args": model_args, "meta": meta, "config": {}, "iter_num": 0, "best_val_loss": 9.0}
    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    return out_dir


def sample_config(*flags):
    return parse_config(sample.SampleConfig, list(flags), "", sample.NANOGPT_FLAGS)


def test_start_becomes_prompt(capsys):
    assert sample_config("--start=Once there was").prompt == "Once there was"
    assert sample_config("--start=FILE:prompt.txt").prompt == "FILE:prompt.txt"
    assert capsys.readouterr().err == "note: --start became --prompt (the text, or FILE:path)\n" * 2
    assert sample_config("--start=a", "--prompt=b").prompt == "b"


def test_sample_with_nanogpt_flags(ckpt_dir, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The dog ran", encoding="utf-8")
    sample.main([f"--out_dir={ckpt_dir}", "--init_from=resume", f"--start=FILE:{prompt}", "--num_samples=2",
                 "--max_new_tokens=3", "--temperature=0.9", "--top_k=5", "--seed=7", "--device=cpu", "--dtype=float32",
                 "--compile=False", "--kv_cache", "--stop_at_eot"])
    captured = capsys.readouterr()
    samples = captured.out.split("\n" + "-" * 15 + "\n")
    assert len(samples) == 3 and all(s.startswith("The dog ran") for s in samples[:2])
    assert captured.err.splitlines() == [
        f"note: --init_from=resume is what sample.py always does: it samples {ckpt_dir}/ckpt.pt",
        "note: --start became --prompt (the text, or FILE:path)"]


def test_sample_init_from_gpt2_names_what_to_use_instead(capsys):
    err = one_line_error(capsys, sample.main, "--init_from=gpt2-xl")
    assert "--init_from=gpt2-xl: sample.py samples only a checkpoint of ours, out_dir/ckpt.pt" in err
    assert "not loaded here: sample those with transformers" in err


NANOGPT_SAMPLE_SAME = dict(out_dir="out-x", num_samples=10, max_new_tokens=500, temperature=0.8, top_k=200, seed=1337,
                           device="cpu", dtype="float16", compile=True)


@pytest.mark.parametrize("name, value", NANOGPT_SAMPLE_SAME.items())
def test_every_other_nanogpt_sample_flag_means_the_same_here(name, value):
    assert getattr(sample_config(f"--{name}={value}"), name) == value


# -----------------------------------------------------------------------------
# Weights & Biases


def test_wandb_missing_is_one_line_saying_how_to_install_it(data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as where it is not installed
    err = one_line_error(capsys, train.main, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *TINY,
                         "--max_iters=1", "--wandb_log")
    assert "--wandb_log=True needs wandb: pip install wandb" in err


def test_wandb_that_cannot_start_is_one_line_saying_what_to_do(data_dir, tmp_path, monkeypatch, capsys):
    import wandb

    def init(**kwargs):  # what wandb.init raises with no API key configured (and WANDB_MODE unset)
        raise wandb.errors.UsageError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setattr(wandb, "init", init)
    err = one_line_error(capsys, train.main, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *TINY,
                         "--max_iters=1", "--wandb_log")
    assert err.endswith("error: wandb could not start (No API key configured. Use `wandb login` to log in.): log in "
                        "with `wandb login`, or log locally with WANDB_MODE=offline, or drop --wandb_log\n")


def read_wandb_file(path):
    """The records of a run's .wandb file: a LevelDB-style log (32 KiB blocks of crc32, length, type + data)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    records, pos, payload = [], 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # too little left of this block for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def wandb_history(run_folder):
    """(run id, {step: {key: value}}) of an offline run folder."""
    (path,) = glob.glob(os.path.join(run_folder, "run-*.wandb"))
    deadline = time.time() + 30
    while True:  # wandb's service process may still be writing the file when finish() has returned: wait for the end
        records = read_wandb_file(path)
        if any(record.WhichOneof("record_type") == "exit" for record in records) or time.time() > deadline:
            break
        time.sleep(0.05)
    run_id, steps = None, {}
    for record in records:
        if record.WhichOneof("record_type") == "run":
            run_id = record.run.run_id
        elif record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            steps.setdefault(record.history.step.num, {}).update(items)
    return run_id, steps


def test_wandb_offline_logs_every_eval_row_and_the_train_progress_and_a_resume_continues_the_run(data_dir, tmp_path,
                                                                                                 monkeypatch):
    pytest.importorskip("wandb")
    for name, value in dict(WANDB_MODE="offline", WANDB_DIR=str(tmp_path), WANDB_SILENT="true",
                            WANDB_CONSOLE="off").items():  # (off: pytest, not wandb, captures the output)
        monkeypatch.setenv(name, value)
    out = str(tmp_path / "out")

    def run(*flags):  # in this process: a second python would spend most of the test importing torch
        train.main([f"--data_dir={data_dir}", f"--out_dir={out}", *TINY, "--eval_interval=2", "--log_interval=1",
                    "--peak_flops=1e12", "--wandb_log", "--wandb_project=tiny", *flags])

    run("--max_iters=2")
    (first,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    run_id, steps = wandb_history(first)
    assert run_id and train.load_checkpoint(os.path.join(out, "ckpt.pt"))["wandb_run_id"] == run_id
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [row["iter"] for row in rows] == [0, 2] and sorted(steps) == [0, 1, 2]
    for row in rows:  # every eval row, as log.jsonl has it
        assert {key: steps[row["iter"]][key] for key in row} == pytest.approx(row)
    for step in (1, 2):  # the train progress at each log_interval, against the step and the tokens seen
        assert {"loss", "lr", "tokens_per_s", "mfu", "tokens", "iter"} <= set(steps[step])
        assert steps[step]["tokens"] == step * 8 * 32 * 2 and steps[step]["mfu"] > 0

    run("--max_iters=4", "--init_from=resume")
    (second,) = set(glob.glob(str(tmp_path / "wandb" / "offline-run-*"))) - {first}
    resumed_id, resumed_steps = wandb_history(second)
    assert resumed_id == run_id and second.endswith(run_id)
    assert {3, 4} <= set(resumed_steps) and resumed_steps[4]["val_loss"] > 0
    assert train.load_checkpoint(os.path.join(out, "ckpt.pt"))["wandb_run_id"] == run_id
