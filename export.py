"""
Export a checkpoint to a Hugging Face transformers folder: a GPT2LMHeadModel with the same logits as ours, and a
tokenizer that gives the same ids as ours.

    python export.py --out_dir=out --hf_dir=out/hf

Then, offline or after uploading the folder to the hub:

    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
    model, tok = AutoModelForCausalLM.from_pretrained("out/hf"), AutoTokenizer.from_pretrained("out/hf")
    generate = pipeline("text-generation", model=model, tokenizer=tok)
    print(generate("Once upon a time", max_new_tokens=100)[0]["generated_text"])

Our GPT is GPT-2's architecture (learned positions, pre-norm blocks, GELU (tanh or exact), LayerNorm eps 1e-5, tied
embeddings), so the export is a renaming of weights, not a conversion. transformers (which brings safetensors) is
needed here only: train.py and sample.py never import it.
"""

import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass

from cli import UserError, interrupt_in_one_line, parse_config, run_main

if __name__ == "__main__":
    interrupt_in_one_line()  # while torch loads

import torch  # noqa: E402

from prepare import EOT_TEXT, load_tokenizer  # noqa: E402
from train import ARCHITECTURE, GPTConfig, bits_per_byte, eval_starts, load_checkpoint  # noqa: E402


@dataclass
class ExportConfig:
    out_dir: str = "out"  # the training run's folder: ckpt.pt (and tokenizer.json for bpe:N) are read from here
    hf_dir: str = ""  # the folder to write; empty means out_dir/hf. Files of an earlier export there are replaced


def main(argv=None):
    cfg = parse_config(ExportConfig, argv, __doc__)
    # the real path: through a symlink, the temporary folder goes beside the real folder, on its filesystem
    hf_dir = os.path.realpath(cfg.hf_dir or os.path.join(cfg.out_dir, "hf"))
    checkpoint = load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))
    meta = checkpoint["meta"]
    tokenizer = load_tokenizer(meta, cfg.out_dir)  # checks tiktoken's files or tokenizer.json, and that they match
    if os.path.exists(hf_dir) and not replaceable(hf_dir):
        names = set(os.listdir(hf_dir)) if os.path.isdir(hf_dir) else {"ckpt.pt"}
        what = ("a file or a training run" if "ckpt.pt" in names else "data from prepare.py" if "meta.json" in names
                else f"the export would replace its own {', '.join(sorted(names & set(EXPORT_FILES)))}")
        raise UserError(f"--hf_dir={hf_dir} exists and is not an earlier export ({what}); give the export a folder "
                        "of its own (the default is out_dir/hf)")
    try:
        import transformers
    except ImportError as e:
        raise UserError(f"export needs transformers ({e}): pip install transformers safetensors") from None
    transformers.logging.set_verbosity_error()  # its advice about generation settings is not for our users
    transformers.logging.disable_progress_bar()  # a bar for writing one small file is noise

    parent = os.path.dirname(hf_dir)
    try:  # everything goes into a temporary folder beside hf_dir, renamed into place at the end
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(hf_dir)}.tmp-", dir=parent)
        old = tmp + ".old"  # the earlier export's files, until the new ones are all in place
        os.mkdir(old)
    except OSError as e:
        raise UserError(f"cannot write to --hf_dir={hf_dir} ({e.strerror}); choose a folder you can write to"
                        ) from None
    placed = []
    try:
        model = hf_model(checkpoint)
        model.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        save_tokenizer(tokenizer, meta, checkpoint["model_args"]["block_size"], cfg.out_dir, tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(checkpoint, model))
        umask = os.umask(0)
        os.umask(umask)
        written = sorted(os.listdir(tmp))
        for name in written:  # mkdtemp and safetensors make owner-only files; an export is for sharing
            os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
        # Only the files the export writes are replaced (and those of an earlier export it no longer writes are
        # removed): hf_dir may be a clone of a Hugging Face repo, with its .git and the user's own files, which stay.
        # The earlier files move aside first, and come back if any step fails: never half of each export.
        os.makedirs(hf_dir, exist_ok=True)
        stale = set(os.listdir(hf_dir)) & set(EXPORT_FILES)
        for name in sorted(set(written) | stale):
            if os.path.exists(os.path.join(hf_dir, name)):
                os.replace(os.path.join(hf_dir, name), os.path.join(old, name))
            if name in written:
                placed.append(name)
                os.replace(os.path.join(tmp, name), os.path.join(hf_dir, name))
    except BaseException as e:  # a full disk, Ctrl-C, ...
        for name in placed:  # the failed swap takes the new files out and puts the earlier export back
            if os.path.exists(os.path.join(hf_dir, name)) and not os.path.exists(os.path.join(old, name)):
                os.remove(os.path.join(hf_dir, name))
        for name in os.listdir(old) if os.path.isdir(old) else []:
            os.replace(os.path.join(old, name), os.path.join(hf_dir, name))
        if isinstance(e, OSError) and e.errno == errno.EXDEV:
            raise UserError(f"--hf_dir={hf_dir} is a mount point: the export is written beside it and renamed into "
                            "place, which cannot cross filesystems; give a folder inside it") from None
        if isinstance(e, OSError):
            raise UserError(f"writing {hf_dir} failed ({e}); check the free space and permissions") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    print(f"exported {cfg.out_dir}/ckpt.pt (iter {checkpoint['iter_num']}) to {hf_dir}")
    return hf_dir


# What an export writes into hf_dir: save_pretrained's files, the tokenizer's and the model card
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json", "README.md")


EXPORT_MARK = "exported by slm's `export.py`"  # in every model card an export writes


def replaceable(path):
    """
    A folder the export may write its files into: one that holds none of them (empty, or a fresh clone of a Hugging
    Face repo: its .git and other files are left alone), or an earlier export (config.json and model.safetensors, and
    the model card export.py wrote), never a training run (--hf_dir=out by mistake) or a data folder, nor a folder
    whose own config.json or README.md they would replace (another model downloaded from the hub, say).
    """
    if not os.path.isdir(path):
        return False
    names = set(os.listdir(path))
    if names & {"ckpt.pt", "meta.json"}:  # a training run, or data prepare.py wrote
        return False
    if not {"config.json", "model.safetensors", "README.md"} <= names:
        return not names & set(EXPORT_FILES)
    try:
        with open(os.path.join(path, "README.md"), encoding="utf-8", errors="replace") as f:
            return EXPORT_MARK in f.read()
    except OSError:  # (a folder named README.md, say)
        return False


# -----------------------------------------------------------------------------
# model


def hf_model(checkpoint):
    """A transformers GPT2LMHeadModel holding the checkpoint's weights, in fp32."""
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    args, meta = checkpoint["model_args"], checkpoint["meta"]
    vocab_size, eot = args["vocab_size"], meta["eot_token"]
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=args["block_size"], n_embd=args["n_embd"], n_layer=args["n_layer"],
        n_head=args["n_head"], n_inner=4 * args["n_embd"],
        # nn.GELU(approximate="tanh") is transformers' gelu_new; the exact one is its gelu
        activation_function="gelu_new" if GPTConfig(**args).gelu == "tanh" else "gelu",  # (older checkpoints: tanh)
        layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # dropout is for training only
        tie_word_embeddings=True, bos_token_id=eot, eos_token_id=eot, architectures=["GPT2LMHeadModel"],
    )
    with torch.device("meta"):  # no time spent on a random init that load_state_dict overwrites at once
        model = GPT2LMHeadModel(config)
    state_dict = hf_state_dict(checkpoint["model"], vocab_size)
    for name, param in model.state_dict().items():  # GPT-2 always has biases: zeros are exactly bias=False
        if name.endswith(".bias") and name not in state_dict:
            state_dict[name] = torch.zeros(param.shape)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as e:  # a fork that changed train.py's model, say
        found = " ".join(str(e).split())[:300]
        raise UserError(f"the checkpoint's weights do not fit GPT-2's layout ({found}): export.py maps train.py's GPT-2 "
                        "model; a model changed in train.py needs the same change here") from None
    model.tie_weights()
    model.eval()
    # Stop at the end-of-text token, which ends every training story. GPT-2 has no padding token: batches pad with
    # end-of-text (masked out), as is usual for GPT-2. Learned positions end at the context length, where generate()
    # fails with an IndexError, so by default a short prompt's continuation stays inside it: half the context (the
    # pipeline's own default, 256 new tokens, passes a context of 256). Not max_length: transformers warns whenever
    # a caller's max_new_tokens overrides that.
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot,
                                               max_new_tokens=default_new_tokens(args["block_size"]))
    return model


def default_new_tokens(block_size):
    """The generation config's max_new_tokens: half the context, so that a short prompt's continuation fits in it."""
    return max(1, min(256, block_size // 2))


def hf_state_dict(ours, vocab_size):
    """Our parameter names and layout -> GPT2LMHeadModel's."""
    sd = {}
    for name, w in ours.items():
        if name == "lm_head.weight":
            continue  # tied to wte: transformers re-ties them on load
        w = w.float()
        if name == "transformer.wte.weight":
            w = w[:vocab_size]  # drop the rows that pad the vocabulary to a multiple of 64: never real tokens
        elif name.endswith(".weight") and w.dim() == 2 and ".h." in name:
            w = w.t()  # GPT-2 uses Conv1D, which stores Linear weights transposed: (in, out)
        sd[name] = w.contiguous()
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


# -----------------------------------------------------------------------------
# tokenizer


def save_tokenizer(ours, meta, block_size, out_dir, hf_dir):
    """
    tokenizer.json (+ tokenizer_config.json) that transformers' AutoTokenizer loads as a plain TokenizersBackend:
    the file's pipeline exactly, with nothing added (no BOS, no prefix space, no clean-up of spaces on decode).
    """
    if meta["tokenizer"] == "gpt2":
        gpt2_tokenizer_from_tiktoken(ours.tiktoken_encoding).save(os.path.join(hf_dir, "tokenizer.json"))
    else:  # already a tokenizers file: the very one the data was encoded with
        shutil.copyfile(os.path.join(out_dir, meta["tokenizer_file"]), os.path.join(hf_dir, "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",  # tokenizer.json as it is, not rebuilt by a model's class
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT,
        # Our encoders treat '<|endoftext|>' written in text as ordinary text (prepare.py appends the real token
        # between stories), so the exported tokenizer must too. Registered as a special token, transformers would
        # otherwise map the text to the token; split_special_tokens makes it split special-token text like any other.
        "split_special_tokens": True,
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False, "model_max_length": block_size,
        "padding_side": "left",  # batched generation continues each prompt from its end
    }
    with open(os.path.join(hf_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config, f, indent=2)


def gpt2_tokenizer_from_tiktoken(enc):
    """
    A tokenizers BPE equal to tiktoken's GPT-2 encoding, from its token ranks alone. tiktoken stores only ranks: the
    merge that made token r is the split into two parts that BPE with the tokens below r reaches, and merging in rank
    order is what tiktoken does. The pre-tokenizer regex (ByteLevel's) is the same as tiktoken's gpt2 pattern.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode  # GPT-2's byte -> printable character map

    ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i != enc.eot_token}
    byte_char = bytes_to_unicode()

    def text(token):
        return "".join(byte_char[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        parts = [bytes([b]) for b in token]
        while True:  # BPE with only the tokens ranked below this one, the lowest-ranked pair first
            pair_ranks = [ranks.get(parts[i] + parts[i + 1], math.inf) for i in range(len(parts) - 1)]
            best = min(range(len(pair_ranks)), key=pair_ranks.__getitem__)
            if pair_ranks[best] >= rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        assert len(parts) == 2, f"token {token!r} is not one merge of two lower-ranked tokens"
        merges.append((text(parts[0]), text(parts[1])))
    vocab = {text(token): rank for token, rank in ranks.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOT_TEXT, special=True)])
    assert tokenizer.token_to_id(EOT_TEXT) == enc.eot_token
    return tokenizer


# -----------------------------------------------------------------------------
# model card


def model_card(checkpoint, model):
    """README.md: what the model is, how it was trained, how good it is and how to use it."""
    meta, args, config = checkpoint["meta"], checkpoint["model_args"], checkpoint["config"]
    shape = asdict(GPTConfig(**args))  # (with GPTConfig's defaults for what older checkpoints did not record)
    # the configuration shown names the model's own shape, which a resume by an older train.py did not record there
    config = {**config, **{name: shape[name] for name in ARCHITECTURE if name in config}}
    loss, which = checkpoint_val_loss(checkpoint)
    if math.isfinite(loss):
        score = (f"{which} val loss **{loss:.4f}** nats/token (perplexity {math.exp(loss):.2f}), "
                 f"**{bits_per_byte(loss, meta):.4f}** bits per byte")
    else:
        score = "not evaluated yet"
    n_params = model.num_parameters()  # as exported: no vocabulary padding, the tied head counted once
    evaluated = ""
    if which == "final" and config.get("eval_tokens"):  # of this checkpoint's evaluation windows (a best loss
        # may come from an earlier run's evaluation, with another --eval_tokens)
        windows = len(eval_starts(meta["val"]["tokens"], args["block_size"], config["eval_tokens"]))
        evaluated = (f", over {windows * args['block_size']:,} of the split's {meta['val']['tokens']:,} tokens "
                     f"({windows:,} evenly spaced windows)")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [gpt2, slm, tinystories]
---

# A {n_params / 1e6:.1f}M-parameter GPT trained with slm

A GPT-2-architecture language model ({args["n_layer"]} layers, {args["n_head"]} heads, width {args["n_embd"]},
context {args["block_size"]} tokens, {"with" if args["bias"] else "without"} biases, {shape["gelu"]} GELU) trained from
scratch with slm on `{config.get("data_dir")}`, and {EXPORT_MARK}: its logits equal the original checkpoint's.

- Tokenizer: `{meta["tokenizer"]}` ({meta["vocab_size"]:,} tokens; end of text `{EOT_TEXT}` = id {meta["eot_token"]},
  which ends each story). Text that spells `{EOT_TEXT}` is ordinary text, as in training.
- Training: {checkpoint["iter_num"]:,} steps, {checkpoint.get("tokens", 0):,} tokens seen.
- Validation: {score}{evaluated}.

## Use

```python
from transformers import pipeline
generate = pipeline("text-generation", model="PATH_OR_HUB_NAME")
print(generate("Once upon a time", max_new_tokens=100)[0]["generated_text"])
```

Generation stops at the end-of-text token, or after {default_new_tokens(args["block_size"])} new tokens unless
`max_new_tokens` says otherwise. Keep the prompt and the new tokens within the context length,
{args["block_size"]} tokens: the learned positions end there, and generating past them fails.

## Training configuration

```json
{json.dumps(config, indent=2)}
```
"""


def checkpoint_val_loss(checkpoint):
    """The val loss of exactly these weights (train.py saves it); else the best one the checkpoint recorded."""
    if math.isfinite(checkpoint.get("val_loss", math.nan)):
        return checkpoint["val_loss"], "final"
    return checkpoint.get("best_val_loss", math.inf), "best"


if __name__ == "__main__":
    run_main(main)
