"""
The command line and config files of every slm script, and its one-line errors.

    @dataclass
    class SampleConfig:
        out_dir: str = "out"  # the folder train.py wrote   <- the trailing comment is the --help text

    config = parse_config(SampleConfig)   # python sample.py [config_file ...] [--key=value ...]

Flags are nanoGPT's `--key=value` (or `--key value`), generated from the fields of one config dataclass per script;
a bare `--key` means True for a field that takes a bool. Config files hold `key = value` lines (Python literals, never
executed) or a JSON object. nanoGPT's names that mean something else here are translated by a table of the script's
(see parse_config). A UserError raised anywhere under run_main() becomes one line on stderr and exit code 2, never a
traceback; so does Ctrl-C (exit code 130), and a reader that goes away (`| head`) ends the script quietly.
"""

import ast
import dataclasses
import difflib
import functools
import inspect
import itertools
import json
import math
import operator
import os
import signal
import sys


class UserError(Exception):
    """Bad input or a broken environment: reported as one line that says what to do, never as a traceback."""


def interrupt_in_one_line():
    """
    From here until run_main takes over, Ctrl-C ends the script with one line and exit code 130, not a traceback:
    for scripts that import torch (a second or two) before run_main can catch anything.
    """
    def interrupted(signum, frame):
        print(f"{os.path.basename(sys.argv[0]) or 'slm'}: interrupted", file=sys.stderr)
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)


def _terminated(signum, frame):
    raise KeyboardInterrupt


def run_main(main, argv=None):
    """
    Run a script's main(); a UserError becomes 'script: error: ...' on stderr and exit code 2. Ctrl-C (or SIGTERM)
    becomes 'script: interrupted' (with what was kept, when main says: raise KeyboardInterrupt('saved ...')) and exit
    code 130, as the shell reports a program that SIGINT ended. A broken pipe (`python sample.py | head`) ends quietly
    with the exit code of a program that SIGPIPE ended, 141.
    """
    name = os.path.basename(sys.argv[0]) or "slm"
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C is a KeyboardInterrupt again, caught below
    signal.signal(signal.SIGTERM, _terminated)  # and a kill (timeout, a job scheduler) cleans up as Ctrl-C does
    try:
        main(argv)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops after the same step: rank 0 says
            print(f"{name}: interrupted" + (f": {e}" if str(e) else ""), file=sys.stderr)  # what it saved
        sys.exit(130)
    except BrokenPipeError:  # the reader has gone: nothing more can be shown
        stdout_to_devnull()
        sys.exit(141)


def first_line(error):
    """An exception's message for a one-line error: its first line, or its type's name when it has none."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def lock_folder(folder, busy_message):
    """
    One writer at a time in a folder: an advisory lock on the folder itself (no lock file is left behind), which the
    system drops when the process ends, however it ends. Returns its file descriptor, to close when done; a folder
    another process holds is UserError(busy_message). (Windows has no flock: there, one run per folder is left to the
    user, and this returns None.)
    """
    try:
        import fcntl
    except ImportError:
        return None
    lock = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        raise UserError(busy_message) from None
    except OSError:  # a filesystem without flock (some NFS, Lustre or FUSE mounts): no lock, as on Windows
        os.close(lock)
        return None
    return lock


def stdout_to_devnull():
    """After stdout has failed (a closed pipe, a full disk): or Python's own flush at exit fails on it again and
    prints a warning."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _takes_bool(kind):
    """Whether a bare --key means True: a bool field, or one that also takes a word (train.py's compile: bool | str)."""
    return kind is bool or bool in getattr(kind, "__args__", ())


def _convert(text, kind, key):
    """Turn one command-line string (or a config-file value) into the field's type, or say why not."""
    if getattr(kind, "__args__", None):  # bool | str: the first type the value fits
        *firsts, last = kind.__args__
        for first in firsts:
            try:
                return _convert(text, first, key)
            except UserError:
                pass
        return _convert(text, last, key)
    if kind is str and isinstance(text, (bool, int, float)):
        return str(text)  # a config file's `compile = False` is the string 'False' to a str field
    if not isinstance(text, str):  # config files give typed values already
        if kind is float and isinstance(text, int) and not isinstance(text, bool):
            if abs(text) > sys.float_info.max:  # (float() would raise OverflowError)
                raise UserError(f"--{key} must be a finite number, got an integer of {len(str(abs(text)))} digits")
            text = float(text)
        if kind is float and isinstance(text, float) and not math.isfinite(text):  # JSON's NaN, Python's 1e999
            raise UserError(f"--{key} must be a finite number, got {text!r}")
        if isinstance(text, kind) and not (kind is int and isinstance(text, bool)):
            return text
        raise UserError(f"--{key} must be {kind.__name__}, got {text!r}")
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise UserError(f"--{key} must be True or False, got {text!r}")
    try:
        value = kind(text)
    except ValueError:
        raise UserError(f"--{key} must be {kind.__name__}, got {text!r}") from None
    if kind is float and not math.isfinite(value):  # nan and inf pass every `x > 0` check, then poison the run
        raise UserError(f"--{key} must be a finite number, got {text!r}")
    return value


ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
              ast.FloorDiv: operator.floordiv}


def _literal(node):
    """A Python literal, or arithmetic on numbers as in nanoGPT's recipes (`gradient_accumulation_steps = 5 * 8`)."""
    if isinstance(node, ast.BinOp) and type(node.op) in ARITHMETIC:
        left, right = _literal(node.left), _literal(node.right)
        if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (left, right)):
            return ARITHMETIC[type(node.op)](left, right)
        raise ValueError("arithmetic on numbers only")
    return ast.literal_eval(node)


def _read_config_file(path, fields):
    """A nanoGPT-style config file of `key = value` lines (Python literals), or a JSON object. Nothing is executed."""
    # A positional argument is always a config file; say so when it is clearly meant as something else.
    usage = "positional arguments are config files; settings are --key=value flags (see --help)"
    if "out_dir" in fields and (os.path.isdir(path) or path.endswith(".pt")):
        folder = path if os.path.isdir(path) else os.path.dirname(path) or "."
        raise UserError(f"{path} is not a config file ({usage}); to use the run in {folder}, give "
                        f"--out_dir={folder}")
    if "train_files" in fields and path.lower().endswith((".txt", ".jsonl", ".parquet", ".csv", ".arrow")):
        raise UserError(f"{path} is not a config file ({usage}); to prepare it, give --train_files={path}")
    try:
        with open(path, encoding="utf-8-sig") as f:  # (Notepad's byte-order mark is dropped)
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
            values[node.targets[0].id] = _literal(node.value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError, ZeroDivisionError, OverflowError):
            raise UserError(f"config file {path}, line {node.lineno}: the value must be a literal, or arithmetic on "
                            "numbers") from None
    return values


SCRIPT_OF = {"TrainConfig": "train.py", "PrepareConfig": "prepare.py", "SampleConfig": "sample.py",
             "ExportConfig": "export.py"}  # each script's config class, which lies beside this file


def _other_scripts_settings(config_cls):
    """{script: its settings} for the other slm scripts, read from their source (importing train.py would import
    torch); train.py first."""
    if config_cls.__name__ not in SCRIPT_OF:  # (a script of a fork's)
        return {}
    return {script: _settings_of(script, class_name) for class_name, script in SCRIPT_OF.items()
            if class_name != config_cls.__name__}


@functools.lru_cache(maxsize=None)
def _settings_of(script, class_name):
    try:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), script), encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (OSError, SyntaxError):  # (a fork without that script)
        return frozenset()
    return frozenset(node.target.id for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name == class_name
                     for node in cls.body if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name))


def parse_config(config_cls, argv=None, description="", nanogpt_flags=None):
    """
    Build a config_cls from config files and --key=value (or --key value) flags, nanoGPT style:
        python train.py [config_file ...] [--key=value ...]
    Files and flags are applied in the order given. An unknown key or a bad value is an error.

    nanogpt_flags is a script's table of nanoGPT's names that mean something else here: name -> (its type,
    translate). translate(value, config) is called once every other flag is applied, so that it sees the values in
    effect, and returns (our settings to change, a note saying what the flag became, or None). A setting given after
    the nanoGPT name wins over its translation.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    nanogpt_flags = nanogpt_flags or {}
    kinds = {f.name: f.type for f in dataclasses.fields(config_cls)}
    kinds.update({name: kind for name, (kind, _) in nanogpt_flags.items()})  # nanoGPT's meaning wins for a shared name
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(config_cls, description, nanogpt_flags))
        sys.exit(0)

    def check_known(key, where):
        if key not in kinds:
            owners = [script for script, settings in _other_scripts_settings(config_cls).items() if key in settings]
            close = difflib.get_close_matches(key, kinds, n=1)
            hint = (f" ({key!r} is a setting of {owners[0]}; see --help)" if owners else
                    f" (did you mean --{close[0]}?)" if close else " (see --help)")
            raise UserError(f"unknown setting {key!r} in {where}{hint}")

    def check_file(path, file_values):
        """`python sample.py configs/tinystories_cpu.py`: a config file for another script says so."""
        unknown = [key for key in file_values if key not in kinds]
        others = _other_scripts_settings(config_cls) if unknown else {}  # (read only when needed)
        owners = [script for script, settings in others.items() if settings.intersection(unknown)]
        if owners:  # the script that takes the most of the file's settings (train.py first, on a tie)
            owner = max(owners, key=lambda script: len(others[script].intersection(file_values)))
            key = next(key for key in unknown if key in others[owner])
            run = file_values.get("out_dir") if "out_dir" in kinds and owner == "train.py" else None
            raise UserError(f"{path} is a config file for {owner} ({key!r} is its setting), not for "
                            f"{SCRIPT_OF[config_cls.__name__]}" + (f"; to use its run, give --out_dir={run}"
                                                                   if isinstance(run, str) else " (see --help)"))

    def set_value(key, value, where):
        check_known(key, where)
        value = _convert(value, kinds[key], key)
        if key.endswith("_dir") and isinstance(value, str):
            value = os.path.expanduser(value)  # the shell leaves ~ alone after --key=: a folder named ~ is a trap
        if key in nanogpt_flags:
            translate_later.append((next(positions), key, value))
        else:
            values[key], set_at[key], set_by[key] = value, next(positions), where
            if where == "the command line":
                from_flag[key] = value

    values, set_at, set_by, translate_later, positions, from_flag = {}, {}, {}, [], itertools.count(), {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            file_values = _read_config_file(arg, kinds)
            check_file(arg, file_values)
            for key, value in file_values.items():
                set_value(key, value, arg)
        elif "=" in arg:
            key, value = arg[2:].split("=", 1)
            set_value(key, value, "the command line")
        elif _takes_bool(kinds.get(arg[2:])):  # a bare --force or --eval_only means True; the next argument is its own
            # unless it is True or False (`--kv_cache False`), or, for a setting that also takes words, a word that is
            # neither a flag nor a config file (`--compile auto`)
            follows = args[0] if args else "--"
            takes_words = kinds[arg[2:]] is not bool
            if follows.lower() in TRUE_WORDS + FALSE_WORDS or (
                    takes_words and not follows.startswith("--") and not os.path.isfile(follows)):
                set_value(arg[2:], args.pop(0), "the command line")
            else:
                set_value(arg[2:], True, "the command line")
        else:  # --key value, as in `python sample.py --prompt "Once upon a time"`
            check_known(arg[2:], "the command line")
            value = args.pop(0) if args else None
            if value is None or value.startswith("--"):
                raise UserError(f"{arg} needs a value: --key=value or --key value")
            set_value(arg[2:], value, "the command line")
    config = config_cls(**values)
    # files and flags apply in the order given, as in nanoGPT: a flag before a file that sets it again is overridden
    notes = [f"{set_by[key]} sets {key}={value!r} over the earlier --{key}={from_flag[key]!r}; put flags after config "
             "files to override them" for key, value in values.items()
             if set_by[key] != "the command line" and from_flag.get(key, value) != value]
    for position, name, value in translate_later:
        changes, note = nanogpt_flags[name][1](value, config)
        if any(set_at.get(key, -1) > position for key in changes):
            continue  # --eval_tokens after --eval_iters: the later one wins, as any setting given twice
        config = dataclasses.replace(config, **changes)
        notes += [note] if note else []
    for note in notes if os.environ.get("RANK", "0") == "0" else []:  # one note under torchrun, not one per process
        print(f"note: {note}", file=sys.stderr)
    return config


def config_help(config_cls, description="", nanogpt_flags=None):
    comments = _field_comments(config_cls)
    script = f"python {os.path.basename(sys.argv[0])}" if sys.argv[0].endswith(".py") else "python SCRIPT.py"
    usage = (f"usage: {script} [config_file ...] [--key=value ...] (in the order given, later ones win; or --key "
             "value; a bare --key means True for True/False)")
    lines = [description.strip(), "", usage, ""]
    flags = [(f"--{f.name}={f.default!r}", comments.get(f.name, "")) for f in dataclasses.fields(config_cls)]
    width = max(len(flag) for flag, _ in flags)
    lines += [f"  {flag:<{width}}  {comment}" for flag, comment in flags]
    if nanogpt_flags:
        names = ", ".join(f"--{name}" for name in nanogpt_flags)
        lines += ["", f"nanoGPT's {names} are translated to the settings above (README: Coming from nanoGPT)"]
    return "\n".join(lines).lstrip()


def print_config(config):
    print("config:", " ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(config).items()))
