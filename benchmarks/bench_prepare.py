"""
prepare.py against the common way to tokenize a corpus: datasets.map(encode, num_proc=cores), then a memmap filled in
1,024 shards (nanoGPT's openwebtext/prepare.py does this). Both run as subprocesses on the same TinyStories-like
corpus, built here by repeating genuine TinyStories text; each run starts with an empty datasets cache.

    python benchmarks/bench_prepare.py                                       # 50 MB, 3 runs of each method
    python benchmarks/bench_prepare.py --mb=500 --methods=prepare-txt,prepare-parquet

Reports wall time, tokens/s (train + val tokens over the whole run, start-up included) and peak resident memory summed
over the process and all its children (sampled from /proc every 20 ms; forked workers' shared pages count once per
process, as `ps` shows them).
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from cli import UserError, parse_config, run_main  # noqa: E402
from prepare import EOT_LINE, EOT_TEXT  # noqa: E402


@dataclasses.dataclass
class BenchConfig:
    source: str = os.path.join(os.path.dirname(ROOT), "shared", "tinystories-sample", "train.txt")  # text to repeat
    mb: int = 50  # corpus size in MB of story text
    runs: int = 3  # runs of each method; the table shows the median
    methods: str = "baseline,prepare-txt,prepare-parquet"  # which to run, comma-separated
    workdir: str = ""  # where the corpus and outputs go (empty = a temporary folder, removed afterwards)
    baseline: str = ""  # (internal) run the common approach on this file, writing into --workdir


def make_corpus(source, mb, folder):
    """corpus.txt (official TinyStories format) and corpus.parquet (a text column, like the hub), >= mb MB of stories."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(source, encoding="utf-8") as f:
        stories = [s.strip("\n") for s in EOT_LINE.split(f.read()) if s.strip()]
    block = sum(len(s.encode()) for s in stories)
    repeats = -(-mb * 1_000_000 // block)
    with open(os.path.join(folder, "corpus.txt"), "w", encoding="utf-8") as txt, \
            pq.ParquetWriter(os.path.join(folder, "corpus.parquet"), pa.schema({"text": pa.string()})) as parquet:
        text, table = "".join(s + f"\n{EOT_TEXT}\n" for s in stories), pa.table({"text": stories})
        for _ in range(repeats):
            txt.write(text)
            parquet.write_table(table)
    return repeats * len(stories), repeats * block


def baseline(path, out_dir, cache_dir):
    """The common approach, written for this benchmark: map(encode, num_proc) and a 1,024-shard memmap write."""
    import numpy as np
    import tiktoken
    from datasets import load_dataset

    enc = tiktoken.get_encoding("gpt2")
    data = load_dataset("parquet", data_files=path, cache_dir=cache_dir)["train"]
    splits = data.train_test_split(test_size=0.005, seed=2357, shuffle=True)

    def encode(row):
        ids = enc.encode_ordinary(row["text"]) + [enc.eot_token]
        return {"ids": ids, "len": len(ids)}

    tokenized = {name: split.map(encode, remove_columns=["text"], num_proc=os.cpu_count())
                 for name, split in (("train", splits["train"]), ("val", splits["test"]))}
    for name, split in tokenized.items():
        out = np.memmap(os.path.join(out_dir, f"{name}.bin"), dtype=np.uint16, mode="w+",
                        shape=(int(np.sum(split["len"], dtype=np.uint64)),))
        shards, at = min(1024, len(split)), 0
        for i in range(shards):
            ids = np.concatenate(split.shard(num_shards=shards, index=i, contiguous=True).with_format("numpy")["ids"])
            out[at:at + len(ids)] = ids
            at += len(ids)
        out.flush()


def tree_memory(root_pid):
    """{pid: (resident bytes now, peak resident bytes so far)} for root_pid and all its descendants, from /proc."""
    parent, memory = {}, {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                parent[int(pid)] = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f)
            memory[int(pid)] = int(status["VmRSS"].split()[0]) * 1024, int(status["VmHWM"].split()[0]) * 1024
        except (OSError, IndexError, KeyError, ValueError):
            pass  # gone, or a kernel thread
    tree, grew = {root_pid}, True
    while grew:
        more = {pid for pid, ppid in parent.items() if ppid in tree} - tree
        tree |= more
        grew = bool(more)
    return {pid: memory[pid] for pid in tree if pid in memory}


def measure(command):
    """
    Run command; return (seconds, peak memory in bytes): the highest sum of resident memory over the process tree seen
    every 20 ms, or the largest single process's own peak (VmHWM, exact) if that is higher.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            memory = tree_memory(proc.pid).values()
            peak[0] = max([peak[0], sum(now for now, _ in memory)] + [hwm for _, hwm in memory])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stderr = proc.communicate()[1]
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    return seconds, peak[0]


def main(argv=None):
    cfg = parse_config(BenchConfig, argv, __doc__)
    if cfg.baseline:
        return baseline(cfg.baseline, cfg.workdir, os.path.join(cfg.workdir, "hf-cache"))
    methods = cfg.methods.split(",")
    unknown = [method for method in methods if method not in ("baseline", "prepare-txt", "prepare-parquet")]
    if unknown:
        raise UserError(f"unknown --methods {','.join(unknown)}: choose from baseline, prepare-txt, prepare-parquet")
    if cfg.runs < 1 or cfg.mb < 1:
        raise UserError(f"--runs and --mb must be at least 1, got {cfg.runs} and {cfg.mb}")
    if not os.path.isfile(cfg.source):
        raise UserError(f"--source={cfg.source} is not a file: pass TinyStories text (a .txt with <|endoftext|> lines)")
    with tempfile.TemporaryDirectory(dir=cfg.workdir or None) as work:
        t = time.perf_counter()
        stories, nbytes = make_corpus(cfg.source, cfg.mb, work)
        print(f"corpus: {stories:,} stories, {nbytes / 1e6:.1f} MB of text ({time.perf_counter() - t:.1f} s to build), "
              f"{os.cpu_count()} cores", flush=True)
        rows = []
        for method in methods:
            results = []
            for run in range(cfg.runs):
                out = os.path.join(work, f"{method}-{run}")
                os.makedirs(out)
                cache = os.path.join(out, "hf-cache")  # empty each run: datasets parses the input every time
                if method == "baseline":
                    command = [sys.executable, __file__, f"--baseline={os.path.join(work, 'corpus.parquet')}",
                               f"--workdir={out}"]
                else:
                    corpus = os.path.join(work, "corpus." + method.split("-")[1])
                    command = [sys.executable, os.path.join(ROOT, "prepare.py"), f"--train_files={corpus}",
                               f"--data_dir={out}", f"--cache_dir={cache}"]
                seconds, peak = measure(command)
                tokens = sum(os.path.getsize(os.path.join(out, f"{s}.bin")) // 2 for s in ("train", "val"))
                if method != "baseline":
                    with open(os.path.join(out, "meta.json")) as f:
                        meta = json.load(f)
                    assert tokens == meta["train"]["tokens"] + meta["val"]["tokens"]
                results.append((seconds, tokens / seconds, peak))
                print(f"  {method} run {run + 1}: {seconds:.2f} s, {tokens:,} tokens, {tokens / seconds / 1e6:.2f} M "
                      f"tokens/s, peak RSS {peak / 1e9:.2f} GB", flush=True)
                subprocess.run(["rm", "-rf", out])
            rows.append((method, statistics.median(r[0] for r in results), statistics.median(r[1] for r in results),
                         max(r[2] for r in results)))
    print(f"\n{nbytes / 1e6:.1f} MB corpus (--mb={cfg.mb}: whole copies of --source), {cfg.runs} runs each, median")
    print("| method | seconds | tokens/s | peak RSS, all processes (max of runs) |\n|---|---|---|---|")
    for method, seconds, rate, peak in rows:
        print(f"| {method} | {seconds:.2f} | {rate / 1e6:.2f} M | {peak / 1e9:.2f} GB |")


if __name__ == "__main__":
    run_main(main)
