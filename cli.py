"""
The command line and config files of every slm script, and its one-line errors.

    @dataclass
    class SampleConfig:
        out_dir: str = "out"  # the folder train.py wrote   <- the trailing comment is the --help text

    config = parse_config(SampleConfig)   # python sample.py [config_file ...] [--key=value ...]

Flags are nanoGPT's `--key=value` (or `--key value`), generated from the fields of one config dataclass per script;
config files hold `key = value` lines (Python literals, never executed) or a JSON object. A UserError raised
anywhere under run_main() becomes one line on stderr and exit code 2, never a traceback; so does Ctrl-C (exit code
130), and a reader that goes away (`| head`) ends the script quietly.
"""

import ast
import dataclasses
import difflib
import inspect
import json
import math
import os
import sys


class UserError(Exception):
    """Bad input or a broken environment: reported as one line that says what to do, never as a traceback."""


def run_main(main, argv=None):
    """
    Run a script's main(); a UserError becomes 'script: error: ...' on stderr and exit code 2. Ctrl-C becomes
    'script: interrupted' (with what was kept, when main says: raise KeyboardInterrupt('saved ...')) and exit code
    130, as the shell reports a program that SIGINT ended. A broken pipe (`python sample.py | head`) ends quietly with
    the exit code of a program that SIGPIPE ended, 141.
    """
    name = os.path.basename(sys.argv[0]) or "slm"
    try:
        main(argv)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"{name}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # The reader has gone: nothing more can be shown. Point stdout at /dev/null, or Python's own flush at exit
        # fails on the same pipe and prints a warning.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)


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
    if kind is str and isinstance(text, (bool, int, float)):
        return str(text)  # a config file's `compile = False` is the string 'False' to a str field
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
        value = kind(text)
    except ValueError:
        raise UserError(f"--{key} must be {kind.__name__}, got {text!r}") from None
    if kind is float and not math.isfinite(value):  # nan and inf pass every `x > 0` check, then poison the run
        raise UserError(f"--{key} must be a finite number, got {text!r}")
    return value


def _read_config_file(path, fields):
    """A nanoGPT-style config file of `key = value` lines (Python literals), or a JSON object. Nothing is executed."""
    # A positional argument is always a config file; say so when it is clearly meant as something else.
    usage = "positional arguments are config files; settings are --key=value flags (see --help)"
    if "out_dir" in fields and (os.path.isdir(path) or path.endswith(".pt")):
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        raise UserError(f"{path} is not a config file ({usage}); to use the run in {folder}, give "
                        f"--out_dir={folder}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        hint = f"; to continue a text, give it as --prompt={path!r}" if "prompt" in fields else ""
        raise UserError(f"cannot read config file {path} (no such file): {usage}{hint}") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text ({usage})") from None
    if path.endswith(".json"):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config file {path} is not valid JSON ({e})") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {path} must hold a JSON object of key: value pairs")
        return values
    values = {}
    if "\x00" in text:
        raise UserError(f"config file {path} is not a text file of `key = value` lines ({usage})")
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as e:
        raise UserError(f"config file {path}, line {e.lineno}: not valid Python syntax") from None
    except (ValueError, MemoryError, RecursionError):  # absurdly deep nesting
        raise UserError(f"config file {path} is not a text file of `key = value` lines ({usage})") from None
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise UserError(f"config file {path}, line {node.lineno}: only `key = value` lines are allowed")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise UserError(f"config file {path}, line {node.lineno}: the value must be a literal") from None
    return values


def parse_config(config_cls, argv=None, description=""):
    """
    Build a config_cls from config files and --key=value (or --key value) flags, nanoGPT style:
        python train.py [config_file ...] [--key=value ...]
    Files and flags are applied in the order given. An unknown key or a bad value is an error.
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
    args = iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            for key, value in _read_config_file(arg, fields).items():
                set_value(key, value, arg)
        elif "=" in arg:
            key, value = arg[2:].split("=", 1)
            set_value(key, value, "the command line")
        else:  # --key value, as in `python sample.py --prompt "Once upon a time"`
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise UserError(f"{arg} needs a value: --key=value or --key value")
            set_value(arg[2:], value, "the command line")
    return config_cls(**values)


def config_help(config_cls, description=""):
    comments = _field_comments(config_cls)
    lines = [description.strip(), "", "usage: [config_file ...] [--key=value ...] (or --key value)", ""]
    flags = [(f"--{f.name}={f.default!r}", comments.get(f.name, "")) for f in dataclasses.fields(config_cls)]
    width = max(len(flag) for flag, _ in flags)
    lines += [f"  {flag:<{width}}  {comment}" for flag, comment in flags]
    return "\n".join(lines).lstrip()


def print_config(config):
    print("config:", " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(config).items()))
