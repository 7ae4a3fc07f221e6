"""export.py: the transformers model and tokenizer it writes give exactly our logits, ids and greedy samples."""

import copy
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import export
import train
from cli import UserError, run_main
from prepare import EOT_TEXT, load_tokenizer, train_bpe
from train import GPT, GPTConfig, TrainConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine.",
    "Tom had a big red ball. \"Look at my ball!\" he said to his mom. She smiled and said, \"It's very nice.\"",
    "The cat and the dog were friends. They liked to run, jump and play together every day.",
    "Ben found a shiny stone in the park. He showed it to his friend Sue, and they were happy.",
]
# Everything a story (or a prompt) might hold, including the text of the end-of-text token, which our tokenizers
# encode as ordinary text.
TEXTS = [
    "Hello world", "Once upon a time", " leading space", "trailing space ", "Don't you'll we've I'm it's",
    "numbers 1234567 3.14 -42", "tabs\tand\t\tmore", "spaces   runs     of  them", "lines\n\nblank\n\n\n", "\r\n",
    "    ", "", "café naïve déjà vu — “quoted” ‘single’ …", "emoji 😀👍🏽🎉 and 👨‍👩‍👧 family",
    "日本語のテキスト 中文 한국어", "Ελληνικά кириллица עברית العربية", "mixed😀text日本abc",
    EOT_TEXT, f"a{EOT_TEXT}b", f"The end.{EOT_TEXT}\nOnce",
    f" {EOT_TEXT} {EOT_TEXT}{EOT_TEXT}", "<|endoftext", "|>", "<|unknown|>", *STORIES,
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: these models are tiny


def random_texts(n, seed=0):
    """Characters drawn from ASCII, whitespace, Latin-1, CJK and emoji: byte sequences no list of examples covers."""
    rng = random.Random(seed)
    ranges = [(32, 126), (9, 13), (160, 255), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F), (0x300, 0x36F)]
    return ["".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def make_checkpoint(out_dir, tokenizer="gpt2", bias=True, seed=0, gelu="tanh"):
    """A tiny model as train.py saves it, with every parameter moved off its initial value (biases start at zero,
    LayerNorm weights at one: a mix-up of those would go unseen)."""
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer == "gpt2":
        meta = {"tokenizer": "gpt2", "tokenizer_file": None}
    else:  # a byte-level BPE as prepare.py trains it, beside ckpt.pt where train.py copies it
        train_bpe(300, iter([STORIES * 4]), os.path.join(out_dir, "tokenizer.json"))
        meta = {"tokenizer": "bpe:300", "tokenizer_file": "tokenizer.json"}
    ours = load_tokenizer(meta, out_dir)
    meta.update(vocab_size=ours.vocab_size, eot_token=ours.eot_token, dtype="uint16",
                train={"file": "train.bin", "tokens": 1000, "stories": 10, "bytes": 4000},
                val={"file": "val.bin", "tokens": 500, "stories": 5, "bytes": 2000})
    torch.manual_seed(seed)
    model_args = dict(block_size=32, vocab_size=ours.vocab_size, n_layer=2, n_head=2, n_embd=32, dropout=0.0,
                      bias=bias, gelu=gelu)
    model = GPT(GPTConfig(**model_args))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    config = dataclasses.asdict(TrainConfig(out_dir=out_dir, bias=bias, n_layer=2, n_head=2, n_embd=32))
    checkpoint = {"version": train.CHECKPOINT_VERSION, "model": model.state_dict(), "model_args": model_args,
                  "meta": meta, "config": config, "iter_num": 7, "best_val_loss": 2.5, "tokens": 7 * 256}
    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    return model.eval(), ours


@pytest.fixture(scope="module", params=[("gpt2", True, "tanh"), ("gpt2", False, "tanh"), ("bpe", True, "tanh"),
                                        ("bpe", False, "tanh"), ("bpe", False, "exact")],
                ids=lambda p: f"{p[0]}-bias{p[1]}-{p[2]}")
def exported(request, tmp_path_factory):
    tokenizer, bias, gelu = request.param
    out_dir = str(tmp_path_factory.mktemp(f"{tokenizer}-{bias}-{gelu}"))
    ours, ours_tokenizer = make_checkpoint(out_dir, tokenizer, bias, gelu=gelu)
    hf_dir = export.main([f"--out_dir={out_dir}", f"--hf_dir={out_dir}/hf"])
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    return dict(ours=ours, ours_tokenizer=ours_tokenizer, model=model.eval(), info=info, bias=bias,
                tokenizer=AutoTokenizer.from_pretrained(hf_dir), hf_dir=hf_dir, out_dir=out_dir)


# --- model ------------------------------------------------------------------


def test_logits_equal_ours(exported):
    ours, model = exported["ours"], exported["model"]
    vocab_size = ours.config.vocab_size
    assert not any(exported["info"].values()), exported["info"]  # no missing, unexpected or re-initialised weights
    assert model.dtype == torch.float32 and model.config.vocab_size == vocab_size
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied
    generator = torch.Generator().manual_seed(1)
    for batch, length in ((4, 32), (2, 5), (1, 1)):
        idx = torch.randint(0, vocab_size, (batch, length), generator=generator)
        with torch.no_grad():
            expected, _ = ours(idx, torch.zeros_like(idx))  # with targets: the logits of every position
            logits = model(idx).logits
        assert logits.shape == (batch, length, vocab_size)  # the padding rows are gone
        torch.testing.assert_close(logits, expected[..., :vocab_size], atol=1e-5, rtol=0)


def test_biases_are_zero_without_bias(exported):
    biases = [p for name, p in exported["model"].named_parameters() if name.endswith(".bias")]
    zero = [bool((p == 0).all()) for p in biases]
    assert zero == [not exported["bias"]] * (6 * 2 + 1)  # ln_1, ln_2, c_attn, c_proj, c_fc, c_proj per block; ln_f


def test_greedy_generate_equals_ours(exported):
    ours, model = exported["ours"], exported["model"]
    eot = exported["ours_tokenizer"].eot_token
    prompt = torch.randint(0, ours.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    prompt[prompt == eot] = 1
    expected = ours.generate(prompt, 24, temperature=0)[0].tolist()  # to the end of the context, 30 of 32 tokens
    got = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=24, do_sample=False)
    got = got[0].tolist()
    # transformers stops at end-of-text (generation_config.json), ours goes on: equal up to there
    end = expected.index(eot, 6) + 1 if eot in expected[6:] else len(expected)
    assert got == expected[:end]
    assert len(got) > 10  # enough generated tokens to mean something


# --- tokenizer --------------------------------------------------------------


def test_tokenizer_encodes_and_decodes_like_ours(exported):
    ours, tokenizer = exported["ours_tokenizer"], exported["tokenizer"]
    assert tokenizer.eos_token_id == exported["model"].generation_config.eos_token_id == ours.eot_token
    for text in TEXTS + random_texts(200):
        ids = ours.encode(text)
        assert tokenizer.encode(text) == ids, text
        assert tokenizer(text)["input_ids"] == ids, text
        assert tokenizer.decode(ids) == ours.decode(ids) == text, text
    assert ours.eot_token not in tokenizer.encode(EOT_TEXT)  # the text is not the token...
    assert tokenizer.decode([ours.eot_token]) == EOT_TEXT  # ...but the token prints as it
    assert tokenizer.decode([ours.eot_token], skip_special_tokens=True) == ""


def test_tiktoken_merges_reproduce_gpt2_on_a_long_text():
    """The vocabulary and merges derived from tiktoken's ranks give tiktoken's ids on a whole page of text."""
    ours = load_tokenizer({"tokenizer": "gpt2"}, "")
    backend = export.gpt2_tokenizer_from_tiktoken(ours.tiktoken_encoding)
    backend.encode_special_tokens = True
    text = open(os.path.join(ROOT, "train.py"), encoding="utf-8").read() + "".join(TEXTS) + "".join(random_texts(500))
    assert backend.encode(text).ids == ours.encode(text)
    assert backend.get_vocab_size() == 50257


# --- files, model card, command line --------------------------------------------


def write_dataset(data_dir):
    """A small bpe:300 dataset as prepare.py writes it: train.py needs real stories to learn and report something."""
    os.makedirs(data_dir)
    train_bpe(300, iter([STORIES]), os.path.join(data_dir, "tokenizer.json"))
    meta = {"tokenizer": "bpe:300", "tokenizer_file": "tokenizer.json"}
    tokenizer = load_tokenizer(meta, data_dir)
    meta.update(vocab_size=tokenizer.vocab_size, eot_token=tokenizer.eot_token, dtype="uint16")
    for split, repeat in (("train", 40), ("val", 8)):
        stories = STORIES * repeat
        ids = tokenizer.encode_stories(stories).astype(np.uint16)
        ids.tofile(os.path.join(data_dir, f"{split}.bin"))
        meta[split] = {"file": f"{split}.bin", "tokens": len(ids), "stories": len(stories),
                       "bytes": len("".join(stories).encode())}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    return meta


def test_export_of_a_trained_run_loads_in_a_pipeline(tmp_path):
    data_dir, out_dir = str(tmp_path / "data"), str(tmp_path / "out")
    meta = write_dataset(data_dir)
    train.main([f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--n_layer=1", "--n_head=2", "--n_embd=32",
                "--block_size=32", "--batch_size=8", "--gradient_accumulation_steps=1", "--max_iters=20",
                "--eval_interval=10", "--eval_tokens=512", "--warmup_iters=2", "--learning_rate=1e-2", "--device=cpu",
                "--compile=False", "--plot=False", "--log_interval=10", "--peak_flops=1e12"])
    export.main([f"--out_dir={out_dir}"])  # hf_dir defaults to out_dir/hf
    hf_dir = os.path.join(out_dir, "hf")
    assert sorted(os.listdir(hf_dir)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                          "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(out_dir)) == ["ckpt.pt", "hf", "log.jsonl", "tokenizer.json"]  # no temporary folders

    # the model card reports this checkpoint's val loss (from the log) and its bits per byte
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["iter"] == 20
    card = open(os.path.join(hf_dir, "README.md"), encoding="utf-8").read()
    assert f"final val loss **{last['val_loss']:.4f}**" in card
    assert f"**{train.bits_per_byte(last['val_loss'], meta):.4f}** bits per byte" in card
    assert f"{20 * 8 * 32:,} tokens seen" in card and '"max_iters": 20' in card

    assert f"over {512:,} of the split's {meta['val']['tokens']:,} tokens (16 evenly spaced windows)" in card

    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(hf_dir).padding_side == "left"  # a batch of prompts continues from each end
    generate = pipeline("text-generation", model=hf_dir)
    text = generate("Once upon a time", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    ckpt = train.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    ours, tokenizer = train.model_from_checkpoint(ckpt).eval(), load_tokenizer(ckpt["meta"], out_dir)
    idx = ours.generate(torch.tensor([tokenizer.encode("Once upon a time")]), 8, temperature=0)[0].tolist()
    expected = tokenizer.decode(idx[:idx.index(ckpt["meta"]["eot_token"])] if ckpt["meta"]["eot_token"] in idx
                                else idx)
    assert text == expected and len(text) > len("Once upon a time")

    # exporting again replaces the export's files and nothing else: the user's notes (or a repo's .git) stay
    with open(os.path.join(hf_dir, "notes.txt"), "wb") as f:
        f.write(b"my notes\n")
    export.main([f"--out_dir={out_dir}"])
    assert sorted(os.listdir(hf_dir)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                          "notes.txt", "tokenizer.json", "tokenizer_config.json"]
    assert open(os.path.join(hf_dir, "notes.txt"), "rb").read() == b"my notes\n"


def test_model_card_names_the_models_own_shape_and_gelu(tmp_path):
    out_dir = str(tmp_path / "out")
    make_checkpoint(out_dir, "bpe", bias=False, gelu="exact")
    path = os.path.join(out_dir, "ckpt.pt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"].update(n_layer=8, gelu="tanh")  # as a resume by an older train.py left it: the flags'
    torch.save(checkpoint, path)
    export.main([f"--out_dir={out_dir}"])
    card = open(os.path.join(out_dir, "hf", "README.md"), encoding="utf-8").read()
    assert "(2 layers, 2 heads, width 32,\ncontext 32 tokens, without biases, exact GELU)" in card
    assert '"n_layer": 2,' in card and '"gelu": "exact"' in card and '"n_layer": 8' not in card
    assert "best val loss **2.5000** nats/token (perplexity 12.18), **0.9017** bits per byte" in card  # val: 4 B/token
    # a file of an earlier export that this one does not write (a sharded model's index) goes with the rest
    index = os.path.join(out_dir, "hf", "model.safetensors.index.json")
    open(index, "w").close()
    export.main([f"--out_dir={out_dir}"])
    assert not os.path.exists(index) and os.path.exists(os.path.join(out_dir, "hf", "model.safetensors"))


def test_no_checkpoint_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), f"--out_dir={tmp_path}/nothing"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("export.py: error: no checkpoint at") and result.stderr.count("\n") == 1


def test_unwritable_hf_dir_is_a_one_line_error(tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    make_checkpoint(out_dir, "bpe")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as e:  # a folder inside a file cannot be made, whoever we are (root included)
        run_main(export.main, [f"--out_dir={out_dir}", f"--hf_dir={blocker}/hf"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: cannot write to --hf_dir=" in err and err.count("\n") == 1


def test_a_model_changed_in_a_fork_is_a_one_line_error(tmp_path, capsys):
    out_dir = str(tmp_path / "out")
    make_checkpoint(out_dir)
    checkpoint = torch.load(os.path.join(out_dir, "ckpt.pt"), weights_only=True)
    fc = checkpoint["model"]["transformer.h.0.mlp.c_fc.weight"]
    checkpoint["model"]["transformer.h.0.mlp.c_fc.weight"] = fc[: fc.shape[0] // 2]  # an MLP of 2 x n_embd
    torch.save(checkpoint, os.path.join(out_dir, "ckpt.pt"))
    with pytest.raises(SystemExit) as e:
        run_main(export.main, [f"--out_dir={out_dir}"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ": error: the checkpoint's weights do not fit GPT-2's layout (" in err
    assert "c_fc.weight" in err and not os.path.exists(os.path.join(out_dir, "hf"))


@pytest.mark.parametrize("where", ["out_dir", "folder", "another model", "file", "data folder"])
def test_what_is_not_an_earlier_export_is_never_replaced(tmp_path, where):
    out_dir = str(tmp_path / "out")
    make_checkpoint(out_dir, "bpe")
    hf_dir = {"out_dir": out_dir, "folder": str(tmp_path / "notes"), "another model": str(tmp_path / "llama"),
              "file": str(tmp_path / "notes.txt"), "data folder": str(tmp_path / "data")}[where]
    if where in ("folder", "another model"):  # a folder whose own config.json the export would replace
        os.makedirs(hf_dir)
        with open(os.path.join(hf_dir, "config.json"), "w") as f:
            f.write('{"mine": true}')
    if where == "another model":  # weights and a model card too, as a model downloaded from the hub has them
        for name, text in (("model.safetensors", "weights"), ("README.md", "# my own model card")):
            with open(os.path.join(hf_dir, name), "w") as f:
                f.write(text)
    elif where == "file":
        open(hf_dir, "w").close()
    elif where == "data folder":  # GPT-2 tokens: no tokenizer.json that the export would replace, only its meta.json
        os.makedirs(hf_dir)
        for name in ("meta.json", "train.bin", "val.bin"):
            open(os.path.join(hf_dir, name), "w").close()
    before = {path: sorted(files) for path, _, files in os.walk(tmp_path)}
    with pytest.raises(UserError, match="is not an earlier export"):
        export.main([f"--out_dir={out_dir}", f"--hf_dir={hf_dir}"])
    assert {path: sorted(files) for path, _, files in os.walk(tmp_path)} == before


def test_train_and_sample_import_without_transformers():
    code = ("import sys; import train, sample; "
            "assert not {'transformers', 'safetensors'} & set(sys.modules), 'imported transformers'")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_default_generation_stays_within_the_context(exported):
    """transformers' pipeline makes 256 new tokens by default; past the learned positions GPT-2 fails."""
    model, tokenizer = copy.deepcopy(exported["model"]), exported["tokenizer"]
    model.generation_config.eos_token_id = None  # (a random model could end early)
    model.generation_config.pad_token_id = 0
    generate = pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "Once upon a time"
    out = generate(prompt, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    assert len(out) == len(tokenizer(prompt)["input_ids"]) + 16  # half the context of 32


def test_export_through_a_symlink_works_beside_the_real_folder(tmp_path, monkeypatch):
    """The temporary folder goes on the real folder's filesystem: a symlink may point to another disk."""
    out_dir = str(tmp_path / "out")
    make_checkpoint(out_dir, "bpe")
    (tmp_path / "disk").mkdir()
    (tmp_path / "disk" / "real").mkdir()
    os.symlink(tmp_path / "disk" / "real", tmp_path / "link")
    made_in = []
    mkdtemp = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: made_in.append(kw["dir"]) or mkdtemp(**kw))
    export.main([f"--out_dir={out_dir}", f"--hf_dir={tmp_path}/link"])
    assert made_in == [str(tmp_path / "disk")]
    assert "model.safetensors" in os.listdir(tmp_path / "disk" / "real")
    assert sorted(os.listdir(tmp_path / "disk")) == ["real"]  # no temporary folders left
