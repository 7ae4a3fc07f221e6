"""
Quality per minute: a recipe trained with each optimizer for the same budget, on the same data, side by side.

    python benchmarks/bench_quality.py --recipe=configs/tinystories_cpu.py --minutes=10
    python benchmarks/bench_quality.py --recipe=configs/tinystories_cpu.py --steps=200 --flags="--eval_interval=100"

Each run is `python train.py RECIPE --optimizer=NAME` in a fresh process, one after the other (never side by side:
they would share the cores), with --max_minutes (wall-clock budget: steps depend on the machine) or --max_iters (equal
steps: exactly reproducible). The figures are train.py's own final evaluation from log.jsonl: val loss (nats/token),
val bits/byte, and the steps, training seconds and whole-process seconds it took. The recipe's data must exist
(see the README's prepare.py line for it).
"""

import dataclasses
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_train import run_checked  # noqa: E402
from cli import parse_config, run_main  # noqa: E402


@dataclasses.dataclass
class BenchQualityConfig:
    recipe: str = "configs/tinystories_cpu.py"  # the train.py config file to run; empty for train.py's defaults
    optimizers: str = "adamw,muon"  # comma-separated --optimizer values, run in this order
    minutes: float = 0.0  # budget per run in minutes of training (--max_minutes); 0 uses --steps
    steps: int = 0  # steps per run (--max_iters) when --minutes is 0; 0 keeps the recipe's own
    flags: str = ""  # more train.py flags for every run, space-separated (e.g. "--data_dir=... --lr_schedule=wsd")
    out_root: str = ""  # where each run's out_dir goes; empty = a temporary folder, deleted afterwards


def run_one(cfg, optimizer, out_dir):
    if cfg.minutes:
        budget = [f"--max_minutes={cfg.minutes}"]
    else:  # (a recipe's own budget in minutes would otherwise win over the steps)
        budget = [f"--max_iters={cfg.steps}", "--max_minutes=0"] if cfg.steps else []
    recipe = [cfg.recipe] if cfg.recipe else []  # --recipe= : train.py's own defaults (the GPU recipe)
    command = [sys.executable, "train.py", *recipe, f"--optimizer={optimizer}", f"--out_dir={out_dir}",
               "--init_from=scratch", "--overwrite=True", *budget, *cfg.flags.split()]  # (a rerun starts over)
    print("$ " + " ".join(command[1:]), flush=True)
    t0 = time.time()
    run_checked(command, cwd=ROOT)  # (a failure ends the benchmark with train.py's own error line)
    wall = time.time() - t0
    with open(os.path.join(out_dir, "log.jsonl"), encoding="utf-8") as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    return dict(last, wall_s=wall)


def main(argv=None):
    cfg = parse_config(BenchQualityConfig, argv, __doc__)
    optimizers = [o for o in cfg.optimizers.split(",") if o]
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        root = cfg.out_root or tmp
        results = {o: run_one(cfg, o, os.path.join(root, o)) for o in optimizers}
    budget = f"{cfg.minutes:g} min" if cfg.minutes else f"{cfg.steps or 'recipe'} steps"
    print(f"\n{cfg.recipe or 'train.py defaults'}, {budget} {cfg.flags}".rstrip())
    print(f"{'optimizer':<10} {'steps':>6} {'val loss':>9} {'val bpb':>8} {'train s':>8} {'wall s':>7}")
    for name, r in results.items():
        print(f"{name:<10} {r['iter']:>6} {r['val_loss']:>9.4f} {r['val_bpb']:>8.4f} {r.get('train_s', 0):>8.1f} "
              f"{r['wall_s']:>7.1f}")


if __name__ == "__main__":
    run_main(main)
