"""
Turn TinyStories (or any text) into the flat token streams that train.py samples from.

    python prepare.py                                   # Hugging Face roneneldan/TinyStories, GPT-2 BPE
    python prepare.py --tokenizer=bpe:4096              # train a small byte-level BPE instead
    python prepare.py --train_files='TinyStories-train.txt' --val_files='TinyStories-valid.txt'

Writes data_dir/train.bin, val.bin (np.uint16 or np.uint32 token ids, the end-of-text token after every story) and
meta.json (tokenizer, vocabulary, counts, source, settings). This file also holds the two small helpers the other
scripts share: the command-line/config-file parser and the tokenizer loader.
"""

import ast
import dataclasses
import difflib
import inspect
import json
import os
import sys

# -----------------------------------------------------------------------------
# shared helpers: one-line errors, --key=value flags generated from a dataclass, tokenizers


class UserError(Exception):
    """Bad input or a broken environment: reported as one line that says what to do, never as a traceback."""


def run_main(main, argv=None):
    """Run a script's main(); a UserError becomes 'script: error: ...' on stderr and exit code 2."""
    try:
        main(argv)
    except UserError as e:
        print(f"{os.path.basename(sys.argv[0]) or 'slm'}: error: {e}", file=sys.stderr)
        sys.exit(2)


def _field_comments(config_cls):
    """The trailing '# comment' of each field in the dataclass source: the --help text, written once."""
    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    comments = {}
    for line in source.splitlines():
        code, _, comment = line.partition("  # ")
        name = code.strip().split(":")[0]
        if comment and name.isidentifier():
            comments[name] = comment.strip()
    return comments


def _convert(text, kind, key):
    """Turn one command-line string (or a config-file value) into the field's type, or say why not."""
    if not isinstance(text, str):  # config files give typed values already
        if kind is float and isinstance(text, int) and not isinstance(text, bool):
            return float(text)
        if isinstance(text, kind) and not (kind is int and isinstance(text, bool)):
            return text
        raise UserError(f"--{key} must be {kind.__name__}, got {text!r}")
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UserError(f"--{key} must be True or False, got {text!r}")
    try:
        return kind(text)
    except ValueError:
        raise UserError(f"--{key} must be {kind.__name__}, got {text!r}") from None


def _read_config_file(path):
    """A nanoGPT-style config file of `key = value` lines (Python literals), or a JSON object. Nothing is executed."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a JSON object of key: value pairs")
        return values
    values = {}
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise UserError(f"config file {path}, line {e.lineno}: not valid Python syntax") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"config file {path}, line {node.lineno}: only `key = value` lines are allowed")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise UserError(f"config file {path}, line {node.lineno}: the value must be a literal") from None
    return values


def parse_config(config_cls, argv=None, description=""):
    """
    Build a config_cls from config files and --key=value flags, nanoGPT style:
        python train.py [config_file ...] [--key=value ...]
    Files are applied in order, then flags. An unknown key, a bad value or a missing '=' is an error.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(config_cls, description))
        sys.exit(0)

    def set_value(key, value, where):
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean --{close[0]}?)" if close else " (see --help)"
            raise UserError(f"unknown setting {key!r} in {where}{hint}")
        values[key] = _convert(value, fields[key].type, key)

    values = {}
    for arg in argv:
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg).items():
                set_value(key, value, arg)
        elif "=" not in arg:
            raise UserError(f"flags take the form --key=value, got {arg!r}")
        else:
            key, value = arg[2:].split("=", 1)
            set_value(key, value, "the command line")
    return config_cls(**values)


def config_help(config_cls, description=""):
    comments = _field_comments(config_cls)
    lines = [description.strip(), "", "usage: [config_file ...] [--key=value ...]", ""]
    for f in dataclasses.fields(config_cls):
        lines.append(f"  --{f.name}={f.default!r:<24} {comments.get(f.name, '')}")
    return "\n".join(lines).lstrip()


def print_config(config):
    print("config:", " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(config).items()))


EOT_TEXT = "<|endoftext|>"


class Tokenizer:
    """
    The two tokenizers slm knows, behind one encode/decode:
      'gpt2'   tiktoken's GPT-2 BPE (50,257 tokens, end-of-text 50256);
      'bpe:N'  a byte-level BPE of N tokens trained by prepare.py and saved as tokenizer.json.
    encode() never turns special-token text inside a story into a special token: the end-of-text token only ever
    comes from prepare.py appending it.
    """

    def __init__(self, name, tokenizer_file=None):
        self.name = name
        if name == "gpt2":
            self._tiktoken = _load_tiktoken_gpt2()
            self.eot_token = self._tiktoken.eot_token
            self.vocab_size = self._tiktoken.n_vocab
        elif name.startswith("bpe:"):
            from tokenizers import Tokenizer as HFTokenizer

            if not tokenizer_file or not os.path.exists(tokenizer_file):
                raise UserError(f"tokenizer {name} needs its tokenizer.json, not found at {tokenizer_file}; "
                                "re-run prepare.py to make it")
            self._tiktoken = None
            self._hf = HFTokenizer.from_file(tokenizer_file)
            self._hf.encode_special_tokens = True  # literal '<|endoftext|>' text stays text (not saved in the file)
            self.eot_token = self._hf.token_to_id(EOT_TEXT)
            self.vocab_size = self._hf.get_vocab_size()
        else:
            raise UserError(f"unknown tokenizer {name!r}: use gpt2 or bpe:N (for example bpe:4096)")

    def encode(self, text):
        if self._tiktoken is not None:
            return self._tiktoken.encode_ordinary(text)
        return self._hf.encode(text).ids

    def decode(self, ids):
        if self._tiktoken is not None:
            return self._tiktoken.decode(ids)
        return self._hf.decode(ids, skip_special_tokens=False)


def load_tokenizer(meta, data_dir):
    """The Tokenizer that made a dataset, from its meta.json and the folder that holds it."""
    tokenizer_file = meta.get("tokenizer_file")
    return Tokenizer(meta["tokenizer"], tokenizer_file and os.path.join(data_dir, tokenizer_file))


def _load_tiktoken_gpt2():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no cache: requests' ConnectionError, or similar
        raise UserError(
            f"tiktoken could not load the GPT-2 BPE files ({type(e).__name__}). It downloads them on first use; "
            "offline, set TIKTOKEN_CACHE_DIR to a folder that holds them, or use --tokenizer=bpe:N") from None
