"""
Generation speed (tokens/s) of sample.py with and without its KV cache, against nanoGPT's sampling loop.

    python benchmarks/bench_sample.py                          # the two CPU configs, up to 3 runs each
    python benchmarks/bench_sample.py --configs=small --runs=5
    python benchmarks/bench_sample.py --configs=gpu --device=cuda  # the default GPU recipe (8/8/512, block 512)

Methods, each timed in a fresh process on the same checkpoint (GPT-2 vocabulary, written by train.py after one step:
a real ckpt.pt, loaded through sample.py's own load path; the weights barely matter for speed):
  nanogpt       nanoGPT's generate() loop (3adf61e): the whole context cropped to block_size re-run for every token,
                a 50K-way multinomial; on a GPU with TF32 and bf16 autocast, as nanoGPT's sample.py runs it.
                nanoGPT's sample.py draws its samples one after another, so its tokens/s is the same for any number
                of samples: it is run with one.
  no-cache      sample.generate_text(kv_cache=False): the whole context re-run for every token, as nanoGPT does.
  cache         sample.generate_text(kv_cache=True), the default.
no-cache and cache load the model with sample.py's --dtype (auto: on an x86 CPU, float16 weights with float32
arithmetic; --dtype=float32 for the exact weights); nanoGPT's loop runs the float32 weights, as nanoGPT does.
Settings: prompt "Once upon a time", temperature 0.8, top_k 200 (nanoGPT's defaults), stop_at_eot=False so every
sample runs its full length. tokens/s = samples x new tokens / generation time, timed after 2 untimed tokens (the
first calls' one-time set-up: CUDA and BLAS initialisation, allocator growth). A measurement taking over
--long seconds is run once. Then the whole `python sample.py` process is timed against its generation alone.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_train import CONFIGS as TRAIN_CONFIGS  # noqa: E402
from bench_train import check_args, run_checked  # noqa: E402
from train import TrainConfig  # noqa: E402

MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size")
CONFIGS = {  # train.py's CPU benchmark configs and its default GPU recipe, GPT-2 vocabulary
    **{name: {k: c[k] for k in MODEL_KEYS} for name, c in TRAIN_CONFIGS.items()},
    "gpu": {k: getattr(TrainConfig, k) for k in MODEL_KEYS},
}
NEW_TOKENS = {"small": [500], "medium": [500, 1000], "gpu": [500, 1000]}
ANCHOR = 65  # tokens/s, nanoGPT's sample.py at 4/4/128 on a 2-core EPYC (BASELINES.md)
PROMPT = "Once upon a time"
METHODS = ("nanogpt", "no-cache", "cache")


def make_checkpoint(config_name, data_dir, out_dir, device):
    """A ckpt.pt written by train.py itself (one optimizer step on GPT-2 tokens), like any a user would sample."""
    flags = [f"--{k}={v}" for k, v in CONFIGS[config_name].items()] + [
        f"--data_dir={data_dir}", f"--out_dir={out_dir}", f"--device={device}", "--compile=False", "--bias=False",
        "--batch_size=1", "--gradient_accumulation_steps=1", "--max_iters=1", "--eval_tokens=1", "--warmup_iters=0",
        "--plot=False"]
    run_checked([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT)


def nanogpt_generate(model, idx, max_new_tokens, temperature=0.8, top_k=200):
    """
    The algorithm of nanoGPT's GPT.generate (3adf61e), written here: for every new token, re-run the model on the
    last block_size tokens, keep the top_k logits, and draw from the full-vocabulary softmax.
    """
    import torch

    block_size = model.config.block_size
    for _ in range(max_new_tokens):
        last_logits = model(idx[:, -block_size:])[0][:, -1, :] / temperature
        threshold = torch.topk(last_logits, min(top_k, last_logits.size(-1))).values[:, -1:]
        last_logits = last_logits.masked_fill(last_logits < threshold, float("-inf"))
        next_id = torch.multinomial(torch.softmax(last_logits, dim=-1), 1)
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def worker(out_dir, method, num_samples, new_tokens, device, dtype):
    """One measurement in this fresh process: prints load and generation seconds as JSON."""
    import torch

    import sample
    import train

    t0 = time.perf_counter()
    autocast = contextlib.nullcontext()
    if method == "nanogpt":  # loaded as nanoGPT's sample.py does: the checkpoint's weights, as they are
        checkpoint = train.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
        tokenizer = sample.load_tokenizer(checkpoint["meta"], out_dir)
        model = train.model_from_checkpoint(checkpoint).eval().to(train.pick_device(device))
        if model.lm_head.weight.device.type == "cuda":  # nanoGPT's sample.py: TF32, and bf16 (else fp16) autocast
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            autocast = torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    else:
        model, tokenizer = sample.load_model(out_dir, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    sync = torch.cuda.synchronize if model.lm_head.weight.device.type == "cuda" else (lambda: None)

    def generate(tokens):
        if method == "nanogpt":
            idx = torch.tensor([tokenizer.encode(PROMPT)], device=model.lm_head.weight.device)
            with torch.no_grad(), autocast:
                nanogpt_generate(model, idx, tokens)
        else:
            sample.generate_text(model, tokenizer, PROMPT, num_samples=num_samples, max_new_tokens=tokens,
                                 kv_cache=method == "cache", stop_at_eot=False)
        sync()

    generate(2)  # first calls: CUDA and BLAS initialisation, allocator growth, which a longer run would not repeat
    t0 = time.perf_counter()
    generate(new_tokens)
    print(json.dumps({"load_s": load_s, "gen_s": time.perf_counter() - t0}))


def measure(out_dir, method, num_samples, new_tokens, device, dtype, runs, long_s):
    results = []
    for _ in range(runs):
        out = run_checked([sys.executable, __file__, "--worker", out_dir, method, str(num_samples), str(new_tokens),
                           device, dtype], cwd=ROOT)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        if results[-1]["gen_s"] > long_s:
            break
    return results


def whole_process(out_dir, new_tokens, device, dtype, runs):
    """Wall time of `python sample.py` generating one sample (output discarded)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run_checked([sys.executable, "sample.py", f"--out_dir={out_dir}", "--num_samples=1",
                     f"--max_new_tokens={new_tokens}", "--stop_at_eot=False", f"--device={device}", f"--dtype={dtype}"],
                    cwd=ROOT)
        times.append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,medium", help="comma-separated: small, medium, gpu")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per measurement; the median is shown")
    parser.add_argument("--long", type=float, default=30.0, help="a measurement taking longer than this runs once")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="sample.py's --dtype for no-cache and cache (nanogpt: fp32)")
    parser.add_argument("--methods", default="nanogpt,no-cache,cache")
    parser.add_argument("--text", default=os.path.join(ROOT, "..", "shared", "tinystories-sample", "train.txt"))
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        out_dir, method, num_samples, new_tokens, device, dtype = args.worker
        return worker(out_dir, method, int(num_samples), int(new_tokens), device, dtype)
    check_args(parser, args, CONFIGS)
    unknown = [method for method in args.methods.split(",") if method not in METHODS]
    if unknown:
        parser.error(f"unknown --methods {','.join(unknown)}: choose from {', '.join(METHODS)}")

    import torch

    from bench_train import make_dataset

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"device {args.device}, sample.py --dtype={args.dtype}")
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(args.text, tmp)
        print(f"{'config':7} {'tokens':>6} {'B':>2} {'method':9} {'tokens/s (runs)':32} {'median':>8} "
              f"{'vs nanoGPT':>10} {'vs 65 tok/s':>11}")
        for name in args.configs.split(","):
            out_dir = os.path.join(tmp, name)
            make_checkpoint(name, tmp, out_dir, args.device)
            measured = {}  # (method, samples, new tokens) -> runs
            for new_tokens in NEW_TOKENS[name]:
                reference = None
                for method in args.methods.split(","):
                    for num_samples in ([1] if method == "nanogpt" else [1, 8]):
                        runs = measure(out_dir, method, num_samples, new_tokens, args.device, args.dtype, args.runs,
                                       args.long)
                        measured[method, num_samples, new_tokens] = runs
                        rates = [num_samples * new_tokens / r["gen_s"] for r in runs]
                        rate = statistics.median(rates)
                        reference = rate if method == "nanogpt" else reference
                        versus = f"{rate / reference:9.1f}x" if reference else f"{'':10}"
                        anchor = f"{rate / ANCHOR:10.1f}x" if name == "small" else ""  # the anchor is at 4/4/128
                        print(f"{name:7} {new_tokens:6} {num_samples:2} {method:9} "
                              f"{', '.join(f'{r:.0f}' for r in rates):32} {rate:8.0f} {versus} {anchor}", flush=True)
            # start-up: the whole process against its own generation (the cache method's median, one sample)
            runs = measured.get(("cache", 1, 500)) or measure(out_dir, "cache", 1, 500, args.device, args.dtype,
                                                               args.runs, args.long)
            gen = statistics.median(r["gen_s"] for r in runs)
            total = whole_process(out_dir, 500, args.device, args.dtype, args.runs)
            print(f"{name:7} `python sample.py --max_new_tokens=500 --num_samples=1`: whole process "
                  f"{', '.join(f'{t:.2f}' for t in total)} s, median {statistics.median(total):.2f} s; generation "
                  f"{gen:.2f} s; so start-up and exit {statistics.median(total) - gen:.2f} s", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "sample.py", "--help"], stdout=subprocess.DEVNULL, check=True, cwd=ROOT)
        print(f"`python sample.py --help`: {time.perf_counter() - t0:.2f} s (torch is not imported)")


if __name__ == "__main__":
    main()
