"""sample.py on CPU: KV cache, sampling controls, seeds, end-of-text, streaming, loading, the CLI and its errors."""

import dataclasses
import os
import platform
import random
import shutil
import subprocess
import sys

import pytest
import tiktoken
import torch

import cli
import prepare
import sample
import train
from cli import UserError
from prepare import Tokenizer
from sample import TextStream, generate_text, load_model
from train import GPT, GPTConfig, sample_next_token

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Multi-byte characters on purpose: with a 300-token byte-level BPE they are spelt with several byte tokens.
TREAT = "crème brûlée 🍰"


def write_stories(path, n, seed):
    """Very regular little stories, separated by blank lines, that a tiny model learns in a few seconds."""
    rng = random.Random(seed)
    stories = []
    for _ in range(n):
        name, color, thing = rng.choice(["Tom", "Lily", "Ben", "Mia"]), rng.choice(["red", "blue", "green"]), \
            rng.choice(["ball", "kite", "car"])
        story = f"{name} had a {color} {thing}. {name} liked the {thing} a lot."
        if rng.random() < 0.5:
            story += f" Then {name} ate a {TREAT} at the café."
        stories.append(story + " The end.")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(stories) + "\n")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these models are tiny


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    """
    A real bpe:300 checkpoint made by prepare.py and train.py (a few seconds). The data folder is deleted afterwards:
    sample.py must work from out_dir alone.
    """
    root = tmp_path_factory.mktemp("sample")
    data, out = root / "data", root / "out"
    write_stories(root / "train.txt", 600, seed=0)
    write_stories(root / "val.txt", 60, seed=1)
    prepare.main([f"--train_files={root / 'train.txt'}", f"--val_files={root / 'val.txt'}", "--tokenizer=bpe:300",
                  f"--data_dir={data}", f"--cache_dir={root / 'hf-cache'}"])
    train.main([f"--data_dir={data}", f"--out_dir={out}", "--n_layer=2", "--n_head=2", "--n_embd=64",
                "--block_size=48", "--batch_size=16", "--gradient_accumulation_steps=1", "--max_iters=250",
                "--eval_interval=250", "--eval_tokens=1536", "--log_interval=250", "--learning_rate=4e-3",
                "--min_lr=4e-4", "--warmup_iters=10", "--device=cpu", "--compile=False", "--plot=False"])
    shutil.rmtree(data)
    shutil.rmtree(root / "hf-cache")
    return str(out)


@pytest.fixture(scope="module")
def loaded(ckpt_dir):
    return load_model(ckpt_dir, device="cpu")


@pytest.fixture(scope="module")
def loaded_fp32(ckpt_dir):
    return load_model(ckpt_dir, device="cpu", dtype="float32")


X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
needs_fp16_kernel = pytest.mark.skipif(not X86, reason="FBGEMM's float16-weight kernel is x86 only")


def sharp_random_model(seed, block_size=16, vocab_size=50):
    """An untrained model whose weights are scaled up, so its next token depends strongly on the whole context."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                          bias=True))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(20)
    return model.eval().double()  # float64: the two paths' different matmul shapes cannot flip a near tie


# --- KV cache ---------------------------------------------------------------


@pytest.mark.parametrize("prompt_len", [1, 5, 16, 30])
def test_greedy_with_cache_equals_without_also_past_block_size(prompt_len):
    for seed in range(4):
        model = sharp_random_model(seed)
        prompt = torch.randint(0, 50, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
        cached = model.generate(prompt, 60, temperature=0, kv_cache=True)
        uncached = model.generate(prompt, 60, temperature=0, kv_cache=False)
        assert torch.equal(cached, uncached)


def test_cache_runs_one_position_per_token_and_slides_rarely():
    model = sharp_random_model(0, block_size=16)
    lengths = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].size(1)))
    list(model.generate_tokens(torch.zeros((1, 3), dtype=torch.long), 100, temperature=0, kv_cache=True))
    assert len(lengths) == 100 and lengths[0] == 3
    slides = [n for n in lengths[1:] if n > 1]
    assert slides == [9] * len(slides)  # block_size // 2 + 1 tokens re-encoded, once per 8 new tokens
    assert len(slides) == (100 - 1 - (16 - 3)) // 8 + 1
    assert sum(lengths) < 2.5 * 100  # against 100 * 16 without the cache


@pytest.mark.parametrize("weights", ["auto", "float32"])
def test_greedy_text_with_cache_equals_without_on_a_trained_model(request, weights, monkeypatch):
    model, tokenizer = request.getfixturevalue("loaded" if weights == "auto" else "loaded_fp32")
    kwargs = dict(max_new_tokens=3 * model.config.block_size, temperature=0, stop_at_eot=False)
    with_cache = generate_text(model, tokenizer, "Mia had", kv_cache=True, **kwargs)

    def no_cache_wanted(*args, **kwargs):
        raise AssertionError("kv_cache=False built a KV cache")

    monkeypatch.setattr(train, "KVCache", no_cache_wanted)  # the same text must come from the no-cache path
    assert generate_text(model, tokenizer, "Mia had", kv_cache=False, **kwargs) == with_cache


@pytest.mark.parametrize("bias", [True, False])
def test_cpu_linear_for_few_rows_is_nn_linear(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias).double()
    for shape in [(1, 1, 24), (3, 1, 24), (1, 5, 24), (32, 24), (2, 20, 24), (24,)]:
        x = torch.randn(*shape, dtype=torch.float64)
        y = sample.linear_for_few_rows(linear, x)
        assert y.shape == linear(x).shape and y.is_contiguous()
        assert torch.allclose(y, linear(x), rtol=0, atol=1e-12)


def test_load_model_gives_cpu_linears_the_few_row_forward(loaded_fp32):
    model, _ = loaded_fp32
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.forward.__func__ is sample.linear_for_few_rows for m in linears)
    assert model.lm_head.weight.dtype == torch.float32


@needs_fp16_kernel
@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_fp16_weights_is_float32_arithmetic_on_rounded_weights(bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 40, bias=bias)
    linear.fp16_weights = torch.ops.quantized.linear_prepack_fp16(linear.weight, linear.bias)
    rounded = linear.weight.detach().half().double()
    for shape in [(1, 1, 48), (3, 1, 48), (1, 5, 48), (32, 48), (2, 20, 48), (48,), (0, 48)]:
        x = torch.randn(*shape)
        y = sample.linear_with_fp16_weights(linear, x)
        expected = x.double() @ rounded.T + (linear.bias.double() if bias else 0)
        assert y.dtype == torch.float32 and y.shape == linear(x).shape
        assert torch.allclose(y.double(), expected, rtol=0, atol=1e-5)  # float32 arithmetic on the rounded weights
        assert not torch.equal(y, linear(x)) or x.numel() == 0  # ... which are not the float32 weights


@needs_fp16_kernel
def test_cpu_default_reads_float16_weights_and_keeps_float32_logits(loaded, loaded_fp32):
    model, _ = loaded
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m.forward.__func__ is sample.linear_with_fp16_weights for m in linears)
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)[0]
        exact = loaded_fp32[0](idx)[0]
    assert logits.dtype == torch.float32
    assert 0 < (logits - exact).abs().max() < 1e-3 * exact.abs().max()


@needs_fp16_kernel
def test_x86_cpus_have_the_fp16_weight_kernel():
    assert sample.has_fp16_weight_kernel()  # else the default would silently fall back to float32 on every x86 CPU


def test_cpu_without_the_fp16_kernel_stays_float32(ckpt_dir, monkeypatch):
    monkeypatch.setattr(sample, "has_fp16_weight_kernel", lambda: False)  # as on an ARM CPU
    model, _ = load_model(ckpt_dir, device="cpu")
    assert model.lm_head.forward.__func__ is sample.linear_for_few_rows
    assert model.lm_head.weight.dtype == torch.float32


@needs_fp16_kernel
def test_weights_beyond_float16_range_or_compile_stay_float32(ckpt_dir, tmp_path):
    checkpoint = torch.load(os.path.join(ckpt_dir, "ckpt.pt"), weights_only=True)
    checkpoint["model"]["transformer.h.0.mlp.c_fc.weight"][0, 0] = 1e5  # past float16's 65,504
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    shutil.copy(os.path.join(ckpt_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
    model, _ = load_model(str(tmp_path), device="cpu")
    assert model.lm_head.forward.__func__ is sample.linear_for_few_rows
    model, _ = load_model(ckpt_dir, device="cpu", compile=True)  # compiles lazily, at the first call: not here
    assert model.lm_head.forward.__func__ is sample.linear_for_few_rows


def test_explicit_float16_is_the_whole_model_in_float16(ckpt_dir):
    model, tokenizer = load_model(ckpt_dir, device="cpu", dtype="float16")
    assert model.lm_head.weight.dtype == torch.float16 and not hasattr(model.lm_head, "fp16_weights")
    assert generate_text(model, tokenizer, "Tom", max_new_tokens=5, temperature=0, stop_at_eot=False)[0]


# --- sampling controls -------------------------------------------------------

# token:         0     1     2     3     4     5
PROBS = torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15, 0.0])


def kept_tokens(top_k=0, top_p=1.0, temperature=1.0, rows=20_000):
    logits = PROBS.clamp_min(1e-30).log().expand(rows, -1).contiguous()
    tokens = sample_next_token(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
    counts = torch.bincount(tokens, minlength=len(PROBS)).double() / rows
    return set(tokens.tolist()), counts


@pytest.mark.parametrize("top_k, top_p, expected", [
    (0, 1.0, {0, 1, 2, 3, 4}),
    (1, 1.0, {1}),
    (2, 1.0, {1, 3}),
    (4, 1.0, {1, 3, 4, 2}),
    (0, 0.3, {1}),  # 0.40 alone reaches 0.3
    (0, 0.5, {1, 3}),  # 0.40 does not reach 0.5; 0.40 + 0.30 does
    (0, 0.8, {1, 3, 4}),  # 0.70 + 0.15 = 0.85
    (0, 0.9, {1, 3, 4, 2}),  # 0.85 + 0.10 = 0.95
    (3, 0.9, {1, 3, 4}),  # top_k first, then top_p within what is left
    (4, 0.5, {1, 3}),
])
def test_top_k_and_top_p_keep_exactly_the_right_tokens(top_k, top_p, expected):
    kept, counts = kept_tokens(top_k, top_p)
    assert kept == expected
    renormalised = torch.zeros(len(PROBS), dtype=torch.float64)
    renormalised[list(expected)] = PROBS[list(expected)].double() / PROBS[list(expected)].sum()
    assert torch.allclose(counts, renormalised, atol=0.015)  # and in the right proportions


def test_temperature_zero_is_argmax_and_low_temperature_sharpens():
    assert kept_tokens(temperature=0)[0] == {1}
    cold, hot = kept_tokens(temperature=0.5)[1], kept_tokens(temperature=4.0)[1]
    assert cold[1] > PROBS[1] + 0.1 and hot[1] < PROBS[1] - 0.1


def test_same_seed_same_text_other_seed_other_text(loaded):
    model, tokenizer = loaded
    kwargs = dict(num_samples=3, max_new_tokens=60, temperature=1.5, top_k=0, stop_at_eot=False)
    first = generate_text(model, tokenizer, "Tom", seed=7, **kwargs)
    assert generate_text(model, tokenizer, "Tom", seed=7, **kwargs) == first
    assert generate_text(model, tokenizer, "Tom", seed=8, **kwargs) != first
    assert len(set(first)) == 3  # the samples of one batch are drawn independently


# --- end of text, streaming ------------------------------------------------------


def test_stops_at_the_end_of_text_token(loaded):
    model, tokenizer = loaded
    stopped = generate_text(model, tokenizer, "Ben had a", num_samples=4, max_new_tokens=150, seed=1)
    for text in stopped:
        assert text.endswith("The end.") and "<|endoftext|>" not in text
        assert len(tokenizer.encode(text)) < 150
    # the model did reach its end-of-text token; without stop_at_eot it carries on into another story
    running = generate_text(model, tokenizer, "Ben had a", num_samples=4, max_new_tokens=150, seed=1,
                            stop_at_eot=False)
    for text in running:
        assert "The end.<|endoftext|>" in text and len(tokenizer.encode(text)) >= 150


def test_streamed_text_never_splits_a_character_and_adds_up(loaded):
    model, tokenizer = loaded
    pieces, lasts = [], []

    def stream(text, last):
        pieces.append(text)
        lasts.append(last)

    texts = generate_text(model, tokenizer, "Lily had a red kite. Lily liked the kite a lot. Then Lily ate a",
                          num_samples=2, max_new_tokens=40, temperature=0, stream=stream)
    assert TREAT in texts[0]  # so there were characters to split
    assert "".join(pieces) == texts[0]
    assert not any("\ufffd" in piece for piece in pieces)
    assert lasts.count(True) == 1 and lasts[-1]


@pytest.mark.parametrize("tokenizer_name", ["gpt2", "bpe"])
def test_text_stream_holds_back_a_split_character(tokenizer_name, ckpt_dir):
    tokenizer = Tokenizer("gpt2") if tokenizer_name == "gpt2" else \
        Tokenizer("bpe:300", os.path.join(ckpt_dir, "tokenizer.json"))
    text = f"Lily ate a {TREAT} — “yum”, 日本語!"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some characters are split over tokens
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == text


# --- prompts --------------------------------------------------------------------


def test_prompt_longer_than_the_context_keeps_its_end_with_a_warning(loaded, capsys):
    model, tokenizer = loaded
    block_size = model.config.block_size
    prompt = "Tom had a blue ball. Tom liked the ball a lot. The end.\n\nMia had a green kite. " * 5
    ids = tokenizer.encode(prompt)
    assert len(ids) > block_size
    text = generate_text(model, tokenizer, prompt, max_new_tokens=2 * block_size, temperature=0, stop_at_eot=False)[0]
    assert f"the prompt is {len(ids)} tokens, longer than the model's context of {block_size}" in \
        capsys.readouterr().err
    expected = model.generate(torch.tensor([ids[-block_size:]]), 2 * block_size, temperature=0)[0, block_size:]
    assert text == tokenizer.decode(expected.tolist())


def test_prompt_from_a_file(tmp_path):
    path = tmp_path / "prompt.txt"
    path.write_text("Once upon a time 🍰\n", encoding="utf-8")
    assert sample.read_prompt(f"FILE:{path}") == "Once upon a time 🍰\n"
    assert sample.read_prompt("plain text") == "plain text"


# --- loading --------------------------------------------------------------------


def test_loads_a_checkpoint_whose_keys_carry_compile_and_ddp_prefixes(ckpt_dir, loaded, tmp_path):
    checkpoint = torch.load(os.path.join(ckpt_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    prefixes = ["_orig_mod.", "module.", "module._orig_mod."]
    checkpoint["model"] = {prefixes[i % 3] + key: value for i, (key, value) in enumerate(checkpoint["model"].items())}
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    shutil.copy(os.path.join(ckpt_dir, "tokenizer.json"), tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    kwargs = dict(max_new_tokens=30, temperature=0, stop_at_eot=False)
    assert generate_text(model, tokenizer, "Tom", **kwargs) == generate_text(*loaded, "Tom", **kwargs)


def test_a_checkpoint_trained_with_dropout_samples_without_it(ckpt_dir, loaded, tmp_path):
    checkpoint = torch.load(os.path.join(ckpt_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    checkpoint["model_args"]["dropout"] = 0.5
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    shutil.copy(os.path.join(ckpt_dir, "tokenizer.json"), tmp_path)
    model, tokenizer = load_model(str(tmp_path), device="cpu")
    assert not model.training
    kwargs = dict(max_new_tokens=30, temperature=0, stop_at_eot=False)
    assert generate_text(model, tokenizer, "Tom", **kwargs) == generate_text(*loaded, "Tom", **kwargs)


def test_bfloat16_weights_on_cpu(ckpt_dir):
    model, tokenizer = load_model(ckpt_dir, device="cpu", dtype="bfloat16")
    assert model.lm_head.weight.dtype == torch.bfloat16
    text = generate_text(model, tokenizer, "Tom had a", max_new_tokens=30, temperature=0)[0]
    assert "liked the" in text


# --- command line ---------------------------------------------------------------


def run_cli(*flags):
    return subprocess.run([sys.executable, "sample.py", *flags], cwd=ROOT, capture_output=True, text=True,
                          encoding="utf-8", timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_cli_prints_each_sample_then_a_line_of_dashes(ckpt_dir, loaded):
    flags = dict(num_samples=3, max_new_tokens=80, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    result = run_cli(f"--out_dir={ckpt_dir}", "--prompt=Mia had a", "--device=cpu",
                     *(f"--{key}={value}" for key, value in flags.items()))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    expected = generate_text(*loaded, "Mia had a", **flags)
    assert result.stdout == "".join(f"Mia had a{text}\n{'-' * 15}\n" for text in expected)


def test_cli_runs_a_gpt2_checkpoint_from_its_folder_alone(tmp_path):
    """
    The GPT-2 tokenizer path (tiktoken), on a random model saved in train.py's checkpoint format: the CLI prints the
    model's own greedy continuation, as generated in-process from the same checkpoint and decoded by tiktoken.
    """
    torch.manual_seed(0)
    model_args = dict(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, dropout=0.0, bias=False)
    meta = {"tokenizer": "gpt2", "tokenizer_file": None, "vocab_size": 50257, "eot_token": 50256}
    checkpoint = {"version": train.CHECKPOINT_VERSION, "model": GPT(GPTConfig(**model_args)).state_dict(),
                  "model_args": model_args, "meta": meta, "config": {}, "iter_num": 0, "best_val_loss": 0.0,
                  "tokens": 0}
    train.save_checkpoint(str(tmp_path / "ckpt.pt"), checkpoint)
    result = run_cli(f"--out_dir={tmp_path}", "--num_samples=2", "--max_new_tokens=50", "--kv_cache=False",
                     "--stop_at_eot=False", "--temperature=0")
    assert result.returncode == 0, result.stderr
    model, _ = load_model(str(tmp_path), device="cpu")  # the CLI's defaults: the same weights and arithmetic
    encoding = tiktoken.get_encoding("gpt2")
    prompt = encoding.encode_ordinary("Once upon a time")
    new = model.generate(torch.tensor([prompt]), 50, temperature=0, kv_cache=False)[0, len(prompt):].tolist()
    assert len(set(new)) > 5  # a continuation worth comparing, not one token repeated
    assert result.stdout == f"Once upon a time{encoding.decode(new)}\n{'-' * 15}\n" * 2


def test_help_lists_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in ("out_dir", "prompt", "num_samples", "max_new_tokens", "temperature", "top_k", "top_p", "seed",
                 "device", "dtype", "compile", "kv_cache", "stop_at_eot"):
        assert f"--{flag}=" in result.stdout
    for field in dataclasses.fields(sample.SampleConfig):
        assert f"--{field.name}=" in result.stdout


def error_of(capsys, *flags):
    """Run the CLI's main in-process; the UserError must become one line on stderr and exit code 2."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(sample.main, list(flags))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and "Traceback" not in err and ": error: " in err
    return err


def write_checkpoint(path, checkpoint):
    os.makedirs(path, exist_ok=True)
    torch.save(checkpoint, os.path.join(path, "ckpt.pt"))
    return str(path)


@pytest.mark.parametrize("flags, message", [
    (["--top_p=0"], "--top_p must be in (0, 1], got 0.0"),
    (["--top_p=1.5"], "--top_p must be in (0, 1], got 1.5"),
    (["--top_p=-0.2"], "--top_p must be in (0, 1], got -0.2"),
    (["--temperature=-1"], "--temperature must be 0 (greedy) or more, got -1.0"),
    (["--top_k=-5"], "--top_k must be 0 (off) or more"),
    (["--num_samples=0"], "--num_samples must be at least 1"),
    (["--prompt="], "the prompt is empty"),
    (["--prompt=FILE:/no/such/prompt.txt"], "cannot read the prompt file /no/such/prompt.txt"),
    (["--device=tpu"], "unknown device 'tpu'"),
    (["--dtype=float64"], "--dtype must be one of auto, float32, bfloat16, float16"),
    (["--temprature=1"], "did you mean --temperature?"),
    (["--num_samples=1000000000000"], "not enough memory to generate 1,000,000,000,000 samples as one batch"),
])
def test_bad_settings_are_one_line_errors(ckpt_dir, capsys, flags, message):
    assert message in error_of(capsys, f"--out_dir={ckpt_dir}", *flags)


def test_empty_prompt_file_is_an_error(ckpt_dir, capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    assert "the prompt is empty" in error_of(capsys, f"--out_dir={ckpt_dir}", f"--prompt=FILE:{tmp_path}/empty.txt")


def test_checkpoint_errors(ckpt_dir, capsys, tmp_path):
    assert f"no checkpoint at {tmp_path}/ckpt.pt" in error_of(capsys, f"--out_dir={tmp_path}")

    (tmp_path / "ckpt.pt").write_text("not a checkpoint at all")
    assert "is not a readable slm checkpoint" in error_of(capsys, f"--out_dir={tmp_path}")

    not_ours = write_checkpoint(tmp_path / "not-ours", {"state_dict": {}})
    assert "is not an slm checkpoint" in error_of(capsys, f"--out_dir={not_ours}")

    checkpoint = torch.load(os.path.join(ckpt_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    checkpoint["version"] = train.CHECKPOINT_VERSION + 1
    future = write_checkpoint(tmp_path / "future", checkpoint)
    assert "incompatible version" in error_of(capsys, f"--out_dir={future}")


def test_a_tokenizer_that_does_not_match_the_checkpoint_is_an_error(ckpt_dir, capsys, tmp_path):
    checkpoint = torch.load(os.path.join(ckpt_dir, "ckpt.pt"), map_location="cpu", weights_only=True)
    checkpoint["meta"]["vocab_size"] = 299  # as if tokenizer.json came from another bpe:N run
    swapped = write_checkpoint(tmp_path / "swapped", checkpoint)
    shutil.copy(os.path.join(ckpt_dir, "tokenizer.json"), swapped)
    assert "(300 tokens, end of text 0) is not the one the data was made with (299 tokens" in \
        error_of(capsys, f"--out_dir={swapped}")


def test_cli_error_is_one_line_without_traceback(tmp_path):
    result = run_cli(f"--out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr == f"sample.py: error: no checkpoint at {tmp_path}/ckpt.pt: train one with train.py, or " \
                            "point --out_dir at its folder\n"
    assert result.stdout == ""


def test_programmatic_errors_are_user_errors(loaded):
    model, tokenizer = loaded
    with pytest.raises(UserError, match="top_p"):
        generate_text(model, tokenizer, "Tom", top_p=0)
    with pytest.raises(UserError, match="prompt is empty"):
        generate_text(model, tokenizer, "")


def test_a_prompt_that_is_not_unicode_text_is_an_error(ckpt_dir, capsys, tmp_path):
    config = tmp_path / "prompt.json"
    config.write_text('{"prompt": "Hi \\ud83d there"}')  # half of a surrogate pair, as JSON can spell it
    assert "the prompt is not valid Unicode text" in error_of(capsys, str(config), f"--out_dir={ckpt_dir}")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_behind_stdout_is_a_one_line_error(ckpt_dir):
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "sample.py", f"--out_dir={ckpt_dir}", "--max_new_tokens=5"],
                                cwd=ROOT, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 2
    assert result.stderr == "sample.py: error: cannot write the samples to standard output (No space left on device)\n"


def test_a_prompt_file_under_the_home_folder(ckpt_dir, loaded, tmp_path, monkeypatch):
    (tmp_path / "prompt.txt").write_text("Mia had a", encoding="utf-8")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert sample.read_prompt("FILE:~/prompt.txt") == "Mia had a"


def test_only_running_out_of_memory_is_blamed_on_the_batch():
    with pytest.raises(UserError, match="generate 1 sample as one batch: lower --max_new_tokens"):
        with sample.memory_for_the_batch(1):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(RuntimeError, match="illegal memory access"):  # a fault, not a batch too large: as it is
        with sample.memory_for_the_batch(4):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
