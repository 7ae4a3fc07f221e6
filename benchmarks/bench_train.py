"""
Training throughput (tokens/s, ms/iter, MFU) of train.py against a plain nanoGPT-style step, side by side.

    python benchmarks/bench_train.py                        # both CPU configs, 3 runs each
    python benchmarks/bench_train.py --configs=small --runs=5 --iters=20

The reference is the step nanoGPT's train.py runs on a CPU: the same GPT, full logits + F.cross_entropy, AdamW
without the fused kernel, glibc's default malloc. "slm" is `python train.py --optimizer=adamw` itself, timed from its
own log lines.
Each measurement is a fresh process (malloc settings are per process); the first iterations are warm-up and not
counted. Data: GPT-2 tokens of ../shared/tinystories-sample (or --text), written once to a temporary folder.
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {  # the two CPU configs of BASELINES.md, GPT-2 vocabulary (padded to 50304), fp32, no compile
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=8),
}
NANOGPT_FIGURES = {"small": 1045, "medium": 408}  # tokens/s, BASELINES.md (nanoGPT 3adf61e, same kind of machine)


def run_checked(command, **kwargs):
    """subprocess.run, capturing output; a failed child ends the benchmark with its own last error line."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode:
        said = (result.stderr.strip().splitlines() or ["(nothing on stderr)"])[-1]
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {os.path.basename(command[1])} exited with "
                 f"{result.returncode}: {said}")
    return result


def check_args(parser, args, configs):
    """One-line errors for what would otherwise fail with a traceback, or deep inside a child process."""
    unknown = [name for name in args.configs.split(",") if name not in configs]
    if unknown:
        parser.error(f"unknown --configs {','.join(unknown)}: choose from {', '.join(configs)}")
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, got {args.runs}")
    if not os.path.isfile(args.text):
        parser.error(f"--text={args.text} is not a file: pass TinyStories text (a .txt with <|endoftext|> lines)")


def make_dataset(text_path, data_dir):
    import numpy as np
    import tiktoken

    enc = tiktoken.get_encoding("gpt2")
    with open(text_path, encoding="utf-8") as f:
        stories = [s.strip("\n") for s in f.read().split("<|endoftext|>") if s.strip()]
    n_val = max(1, len(stories) // 20)
    meta = {"tokenizer": "gpt2", "tokenizer_file": None, "vocab_size": enc.n_vocab, "eot_token": enc.eot_token,
            "dtype": "uint16"}
    for split, part in (("train", stories[n_val:]), ("val", stories[:n_val])):
        ids = [t for s in part for t in enc.encode_ordinary(s) + [enc.eot_token]]
        np.array(ids, dtype=np.uint16).tofile(os.path.join(data_dir, f"{split}.bin"))
        meta[split] = {"file": f"{split}.bin", "tokens": len(ids), "stories": len(part),
                       "bytes": sum(len(s.encode()) for s in part)}
    with open(os.path.join(data_dir, "meta.json"), "w") as f:
        json.dump(meta, f)


def reference_worker(data_dir, config_name, iters, warmup):
    """nanoGPT's CPU step: full logits and cross-entropy, unfused AdamW, default malloc. Prints ms/iter."""
    import torch

    import train

    c = CONFIGS[config_name]
    torch.manual_seed(1337)
    meta = train.load_meta(data_dir)
    model = train.GPT(train.GPTConfig(block_size=c["block_size"], vocab_size=50304, n_layer=c["n_layer"],
                                      n_head=c["n_head"], n_embd=c["n_embd"], dropout=0.0, bias=False))
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    device = torch.device("cpu")
    times = []
    for it in range(warmup + iters):
        t0 = time.perf_counter()
        starts = torch.randint(meta["train"]["tokens"] - c["block_size"], (c["batch_size"],), generator=generator)
        x, y = train.get_batch(data_dir, meta, "train", starts.numpy(), c["block_size"], device)
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"ms_per_iter": 1000 * statistics.median(times[warmup:])}))


def run_reference(data_dir, config_name, iters, warmup):
    out = run_checked([sys.executable, __file__, "--worker", data_dir, config_name, str(iters), str(warmup)])
    return json.loads(out.stdout.strip().splitlines()[-1])["ms_per_iter"]


def run_slm(data_dir, config_name, iters, warmup, out_dir):
    c = CONFIGS[config_name]
    flags = [f"--{k}={v}" for k, v in c.items()] + [
        f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--compile=False", "--dtype=float32",
        "--gradient_accumulation_steps=1", f"--max_iters={warmup + iters}", "--log_interval=1",
        f"--eval_interval={10 * (warmup + iters)}", "--eval_tokens=1", "--plot=False", "--warmup_iters=0",
        "--overwrite=True",  # each run starts over in the same out_dir
        "--optimizer=adamw"]  # the reference's optimizer: the same work per step, whatever train.py's default is
    out = run_checked([sys.executable, os.path.join(ROOT, "train.py"), *flags], cwd=ROOT)
    lines = re.findall(r"^iter (\d+)/\d+ \| .*?\| ([\d.]+) ms/iter \| .*?\| mfu ([\d.]+)%", out.stdout, re.M)
    timed = [(float(ms), float(mfu)) for it, ms, mfu in lines if int(it) > warmup]
    return statistics.median(ms for ms, _ in timed), statistics.median(m for _, m in timed)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="small,medium", help="comma-separated: small, medium")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per measurement; the median is shown")
    parser.add_argument("--iters", type=int, default=12, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per run")
    parser.add_argument("--text", default=os.path.join(ROOT, "..", "shared", "tinystories-sample", "train.txt"))
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        data_dir, name, iters, warmup = args.worker
        return reference_worker(data_dir, name, int(iters), int(warmup))
    check_args(parser, args, CONFIGS)

    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(args.text, tmp)
        print(f"{'config':8} {'method':10} {'ms/iter (runs)':40} {'median':>8} {'tok/s':>8} {'vs ref':>7} "
              f"{'vs nanoGPT fig.':>15} {'MFU':>6}")
        for name in args.configs.split(","):
            tokens_per_iter = CONFIGS[name]["batch_size"] * CONFIGS[name]["block_size"]
            ref = [run_reference(tmp, name, args.iters, args.warmup) for _ in range(args.runs)]
            slm = [run_slm(tmp, name, args.iters, args.warmup, os.path.join(tmp, "out")) for _ in range(args.runs)]
            ref_ms = statistics.median(ref)
            for method, runs in (("reference", ref), ("slm", [ms for ms, _ in slm])):
                ms = statistics.median(runs)
                tok_s = tokens_per_iter / ms * 1000
                mfu = f"{statistics.median(m for _, m in slm):.0f}%" if method == "slm" else ""
                print(f"{name:8} {method:10} {', '.join(f'{r:.0f}' for r in runs):40} {ms:8.0f} {tok_s:8.0f} "
                      f"{ref_ms / ms:6.2f}x {tok_s / NANOGPT_FIGURES[name]:14.2f}x {mfu:>6}")


if __name__ == "__main__":
    main()
