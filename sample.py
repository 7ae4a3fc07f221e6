"""
Generate stories from a checkpoint written by train.py. Everything it needs is in out_dir: ckpt.pt (weights, model
shape, and the data's meta.json, which names the tokenizer) and, for a bpe:N tokenizer, tokenizer.json.

    python sample.py --prompt="Once upon a time"
    python sample.py --out_dir=out --num_samples=5 --temperature=0.9 --top_p=0.95
    python sample.py --prompt=FILE:prompt.txt --max_new_tokens=1000
    python sample.py --temperature=0                     # greedy: always the most likely token

Samples are generated together as one batch. The first is printed token by token as it is generated; the others,
which were generated alongside it, are printed when the batch is done. Each sample is followed by a line of dashes.

From Python:

    from sample import load_model, generate_text
    model, tokenizer = load_model("out", device="cpu")
    stories = generate_text(model, tokenizer, "Once upon a time", num_samples=2, max_new_tokens=200)
"""

import contextlib
import os
import sys
import types
from dataclasses import dataclass

from cli import UserError, parse_config, run_main, stdout_to_devnull
from prepare import load_tokenizer

# torch and train.py (which imports torch) are imported inside the functions that need them: `--help` and bad
# flags answer at once instead of after a second or two of importing torch.

# -----------------------------------------------------------------------------
# config


@dataclass
class SampleConfig:
    out_dir: str = "out"  # the folder train.py wrote: ckpt.pt (and tokenizer.json for a bpe:N tokenizer)
    prompt: str = "Once upon a time"  # the text to continue, or FILE:path to read it from a UTF-8 file
    num_samples: int = 3  # samples generated together as one batch; the first one is printed as it is generated
    max_new_tokens: int = 500  # tokens to generate for each sample (fewer when it ends with the end-of-text token)
    temperature: float = 0.8  # below 1 picks likelier tokens, above 1 more surprising ones; 0 is greedy
    top_k: int = 200  # sample only from the k most likely tokens; 0 keeps them all
    top_p: float = 1.0  # sample only from the fewest most likely tokens whose probability reaches top_p, in (0, 1]
    seed: int = 1337  # the same seed, settings and checkpoint give the same text
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (float16 weights, float32 math on x86 CPUs; else float32), float32, bfloat16, float16
    compile: bool = False  # torch.compile the model: slow to start (a minute on a CPU, where it ran slower, not faster)
    kv_cache: bool = True  # keep earlier positions' keys and values; False recomputes the whole context every token
    stop_at_eot: bool = True  # end a sample at the end-of-text token (the end of a story)


DTYPES = ("auto", "float32", "bfloat16", "float16")


def init_from_as_nanogpt(init_from, config):
    if init_from != "resume":
        raise UserError(f"--init_from={init_from}: sample.py samples only a checkpoint of ours, out_dir/ckpt.pt "
                        "(nanoGPT's --init_from=resume); Hugging Face models such as GPT-2, or export.py's output, "
                        "are not loaded here: sample those with transformers")
    return {}, f"--init_from=resume is what sample.py always does: it samples {config.out_dir}/ckpt.pt"


# nanoGPT's sample.py flags whose name differs here: name -> (type, translate(value, config) -> (our settings, a note)),
# applied by parse_config to flags and config files alike. nanoGPT's other flags mean the same here (README: Coming
# from nanoGPT).
NANOGPT_FLAGS = {
    "start": (str, lambda start, config: ({"prompt": start}, "--start became --prompt (the text, or FILE:path)")),
    "init_from": (str, init_from_as_nanogpt),
}


def check_settings(temperature, top_k, top_p, num_samples=1, max_new_tokens=0, seed=0):
    """Reject settings that cannot sample, before the model is loaded."""
    problems = []
    if not temperature >= 0:  # (also catches nan)
        problems.append(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if top_k < 0:
        problems.append(f"--top_k must be 0 (off) or more, got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"--top_p must be in (0, 1], got {top_p}: 1 turns it off, 0.9 keeps the likeliest 90%")
    if num_samples < 1:
        problems.append(f"--num_samples must be at least 1, got {num_samples}")
    if max_new_tokens < 0:
        problems.append(f"--max_new_tokens must be 0 or more, got {max_new_tokens}")
    if not -2**63 <= seed < 2**64:  # what torch.Generator takes
        problems.append(f"--seed must be from -2**63 to 2**64 - 1, got {seed}")
    if problems:
        raise UserError("; ".join(problems))


# -----------------------------------------------------------------------------
# loading


def load_model(out_dir="out", device="auto", dtype="auto", compile=False):
    """
    (model, tokenizer) from out_dir/ckpt.pt, in eval mode on the device, its weights in dtype: float32, bfloat16 or
    float16 for the whole model; auto for float32, with the Linears reading a float16 copy on an x86 CPU.
    """
    import torch

    from train import keep_freed_memory, load_checkpoint, model_from_checkpoint, pick_device

    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = pick_device(device)
    # Loaded onto the CPU first, whatever device it was saved from, then moved: a checkpoint from a GPU loads on a
    # laptop. load_checkpoint uses weights_only=True, checks the version and strips torch.compile/DDP key prefixes.
    checkpoint = load_checkpoint(os.path.join(out_dir, "ckpt.pt"), map_location="cpu", mmap=True)
    tokenizer = load_tokenizer(checkpoint["meta"], out_dir)  # train.py copied tokenizer.json here for bpe:N
    model = model_from_checkpoint(checkpoint)
    del checkpoint  # (the model has copied the weights out of the mapped file)
    # auto is float32 on a GPU. In 16-bit arithmetic two logits can round to a tie or swap, so greedy text with and
    # without the KV cache parted after 231 tokens in bf16 on an H200 (never in fp32). Nor is bf16 faster there: one
    # token of a small model is bound by kernel launches (fp32 364 vs bf16 250 tokens/s at 8x512). On a CPU one token
    # is bound by reading the weights, so auto reads a float16 copy of them where the CPU has the kernel for that, and
    # the arithmetic stays float32 (see linear_with_fp16_weights). Not under torch.compile, which cannot trace the
    # packed copy and would break its graph at every Linear, nor for weights beyond float16's range.
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    fp16_weights = dtype == "auto" and device.type == "cpu" and not compile and has_fp16_weight_kernel()
    if fp16_weights:
        fp16_weights = max(m.weight.abs().max().item() for m in linears) <= torch.finfo(torch.float16).max
    # Sampling needs no fp32 master weights: casting them once is faster than autocasting every op.
    model.eval().to(device=device, dtype=torch.float32 if dtype == "auto" else getattr(torch, dtype))
    for module in linears:
        if fp16_weights:
            module.fp16_weights = torch.ops.quantized.linear_prepack_fp16(module.weight, module.bias)
            module.forward = types.MethodType(linear_with_fp16_weights, module)
        elif device.type == "cpu":
            module.forward = types.MethodType(linear_for_few_rows, module)
    if device.type == "cpu":
        keep_freed_memory()  # the per-token logits buffers are reused instead of mapped afresh
    if compile:
        # Compile the module itself, so the self(...) calls inside generate_tokens run the compiled graph; dynamic
        # shapes, because the context grows by one token at every step.
        model.compile(dynamic=True)
    return model, tokenizer


def has_fp16_weight_kernel():
    """Whether this CPU runs float32 activations against float16 weights (FBGEMM: x86 with AVX2; not ARM)."""
    import torch

    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(1, 1), None)
        return torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 1), packed).item() == 1.0
    except (AttributeError, NotImplementedError, RuntimeError):  # an op missing from this build, or unsupported
        return False


def linear_with_fp16_weights(self, x):
    """
    nn.Linear's forward on a CPU, reading a float16 copy of the weights (self.fp16_weights, packed by load_model) and
    doing the arithmetic in float32: FBGEMM's kernel for few-row inference converts the weights as it reads them. One
    token of each sample is a product of 1 to num_samples rows with every weight matrix, so generation is bound by
    reading the weights: 119 MB per token in float32 at 6/6/384 with GPT-2's vocabulary, half that here. One sample at
    6/6/384: 190 -> 309 tokens/s (benchmarks/README.md). The logits are float32 arithmetic on the weights rounded to
    11 significant bits: they move by about 2e-4 of the largest. The copy is a snapshot: changing self.weight later
    does not change it. --dtype=float32 reads the exact weights.
    """
    import torch

    if x.dim() == 1:  # the kernel takes rows
        return torch.ops.quantized.linear_dynamic_fp16(x[None], self.fp16_weights)[0]
    return torch.ops.quantized.linear_dynamic_fp16(x, self.fp16_weights)


def linear_for_few_rows(self, x):
    """
    nn.Linear's forward, for a CPU. One token of each sample is a product of 1 to num_samples rows with every weight
    matrix, so generation is bound by reading the weights (119 MB per token at 6/6/384 with GPT-2's vocabulary).
    x @ W.T for up to ~32 rows runs on slow paths of the CPU's BLAS, well below memory speed; the same product taken
    as (W @ x.T).T, at least two rows wide, runs at memory speed. The 50K x 384 LM head: 8.1 -> 1.9 ms for one row,
    27 -> 2.9 ms for three (benchmarks/README.md).
    """
    n = x.numel() // x.size(-1)
    if not 0 < n <= 32:
        return type(self).forward(self, x)  # nn.Linear's own
    rows = x.reshape(n, x.size(-1))
    if n == 1:
        rows = rows.expand(2, -1).contiguous()
    y = self.weight.mm(rows.t()).t()[:n].contiguous()  # the ops that follow run faster on contiguous rows
    if self.bias is not None:
        y += self.bias
    return y.view(*x.shape[:-1], y.size(-1))


def read_prompt(prompt):
    """--prompt as text: itself, or the contents of a file for FILE:path."""
    if any("\udc80" <= c <= "\udcff" for c in prompt):
        # Python decoded the command line with an ASCII locale (LC_ALL=C), keeping each other byte as a surrogate:
        # those are the prompt's UTF-8 bytes.
        try:
            prompt = os.fsencode(prompt).decode("utf-8")
        except UnicodeError:
            raise UserError("the prompt is not UTF-8 text: give it in UTF-8, or as --prompt=FILE:path to a UTF-8 "
                            "file") from None
    if prompt.startswith("FILE:"):
        path = os.path.expanduser(prompt[len("FILE:"):])
        try:
            with open(path, encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise UserError(f"cannot read the prompt file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise UserError(f"the prompt file {path} is not UTF-8 text") from None
    if not prompt:
        raise UserError("the prompt is empty: give some text to continue, e.g. --prompt='Once upon a time'")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, as a JSON config file can spell one ("\ud83d")
        raise UserError("the prompt is not valid Unicode text (it holds half of a surrogate pair); give it as "
                        "plain text") from None
    return prompt


def encode_prompt(tokenizer, prompt, block_size):
    """The prompt's token ids, cropped to the model's context (its most recent tokens) with a warning."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt is empty: give some text to continue, e.g. --prompt='Once upon a time'")
    if len(ids) > block_size:
        print(f"warning: the prompt is {len(ids)} tokens, longer than the model's context of {block_size}: "
              f"it sees only the last {block_size}", file=sys.stderr)
        ids = ids[-block_size:]
    return ids


# -----------------------------------------------------------------------------
# generation


class TextStream:
    """
    A sample's text as its tokens arrive. One character can be split over several tokens (GPT-2 spells most emoji
    and many accented letters with two or three byte-level tokens); decoded alone, each part is a replacement
    character U+FFFD. So the tokens since the last printed text are held back while their text ends in U+FFFD, and
    printed once it no longer does. What is printed always ends on a whole character, so the pieces joined equal
    the decoding of all the tokens at once.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token):
        """The text that token completes ('' while a character is still unfinished)."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd"):
            return ""
        self.pending = []
        return text

    def flush(self):
        """Whatever is held back, at the end of a sample (a character the model never finished stays U+FFFD)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text


@contextlib.contextmanager
def memory_for_the_batch(num_samples):
    """Running out of memory for the batch (its contexts, KV cache and logits) is a one-line error."""
    import torch

    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not isinstance(e, torch.OutOfMemoryError) and \
                "can't allocate memory" not in str(e):  # the CPU allocator's words; any other error is not ours
            raise
        fix = ("lower --num_samples (run again with another --seed for more)" if num_samples > 1 else
               "lower --max_new_tokens, or sample on another --device")
        raise UserError(f"not enough memory to generate {num_samples:,} sample{'s' * (num_samples > 1)} as one "
                        f"batch: {fix}") from None


def generate_text(model, tokenizer, prompt, num_samples=1, max_new_tokens=500, temperature=0.8, top_k=200,
                  top_p=1.0, seed=1337, kv_cache=True, stop_at_eot=True, stream=None):
    """
    Continue prompt (text) num_samples times, as one batch; returns the continuations (without the prompt), each
    cut before its end-of-text token when stop_at_eot. stream, if given, is called as stream(text, last) with the
    first sample's text as it is generated, in pieces that never split a character; last is True on the final call.
    The same seed gives the same text for the same model, settings and device.
    """
    import torch

    check_settings(temperature, top_k, top_p, num_samples, max_new_tokens, seed)
    device = model.lm_head.weight.device
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    generator = torch.Generator(device=device).manual_seed(seed)  # our own: the global RNG is left alone
    eot = tokenizer.eot_token if stop_at_eot else None
    first = TextStream(tokenizer)
    with torch.inference_mode(), memory_for_the_batch(num_samples):
        idx = torch.tensor([ids], dtype=torch.long, device=device).repeat(num_samples, 1)
        new_ids = [[] for _ in range(num_samples)]
        finished = [False] * num_samples
        steps = model.generate_tokens(idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                      kv_cache=kv_cache, generator=generator)
        for tokens in steps:
            for i, token in enumerate(tokens.tolist()):  # one device-to-host copy per step, for the whole batch
                if finished[i]:
                    continue  # a finished sample keeps generating with the batch; its tokens are dropped
                if token == eot:
                    finished[i] = True
                    continue
                new_ids[i].append(token)
                if i == 0 and stream is not None:
                    text = first.push(token)
                    if text:
                        stream(text, False)
            if stream is not None and finished[0] and first is not None:
                stream(first.flush(), True)
                first = None
            if all(finished):
                break  # every story has ended: stop the batch early
    if stream is not None and first is not None:
        stream(first.flush(), True)
    return [tokenizer.decode(sample) for sample in new_ids]


# -----------------------------------------------------------------------------
# command line


def main(argv=None):
    config = parse_config(SampleConfig, argv, __doc__, NANOGPT_FLAGS)
    check_settings(config.temperature, config.top_k, config.top_p, config.num_samples, config.max_new_tokens,
                   config.seed)
    prompt = read_prompt(config.prompt)
    model, tokenizer = load_model(config.out_dir, config.device, config.dtype, config.compile)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # a console that cannot show a character shows '?', not a crash
    dashes = "-" * 15

    def show(text, end="\n"):
        try:
            print(text, end=end, flush=True)
        except BrokenPipeError:
            raise  # the reader has gone (`| head`): run_main ends quietly
        except OSError as e:  # a full disk behind `> file`, say
            stdout_to_devnull()
            raise UserError(f"cannot write the samples to standard output ({e.strerror})") from None

    def stream(text, last):
        show(text, end="\n" + dashes + "\n" if last else "")

    show(prompt, end="")
    try:
        samples = generate_text(model, tokenizer, prompt, config.num_samples, config.max_new_tokens,
                                config.temperature, config.top_k, config.top_p, config.seed, config.kv_cache,
                                config.stop_at_eot, stream)
    except KeyboardInterrupt:
        show("")  # ends the line being streamed: 'sample.py: interrupted' (stderr) then starts a line of its own
        raise
    for sample in samples[1:]:
        show(prompt + sample)
        show(dashes)


if __name__ == "__main__":
    run_main(main)
