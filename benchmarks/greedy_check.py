"""
Does greedy decoding give the same tokens with and without the KV cache, on a real checkpoint, device and dtype?

    python benchmarks/greedy_check.py --out_dir=out --device=cuda --dtypes=float32,bfloat16 --max_new_tokens=1200
    python benchmarks/greedy_check.py --out_dir=out-cpu --device=cpu --dtypes=float32,auto

The two paths run different kernels (one query row against the cache, or the whole window at once), so their logits
agree only to rounding. In float32 arithmetic that never decides an argmax in practice; in 16-bit arithmetic two logits
can round to a tie or swap, and the texts then part. Prints, per dtype, whether the texts match and where they first
differ (in generated tokens), and where the cached tokens first differ from the first dtype's (with float32 first: how
far the rounded weights of auto on a CPU, float16 weights with float32 arithmetic, go before their greedy text leaves
the exact weights'). Exits with status 1 if cached and uncached differ for float32 or auto, whose arithmetic is
float32.
"""

import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import parse_config, run_main  # noqa: E402


@dataclass
class GreedyCheckConfig:
    out_dir: str = "out"  # where ckpt.pt is
    device: str = "auto"  # auto, cpu, cuda, mps
    dtypes: str = "float32,bfloat16"  # comma-separated weight dtypes to try
    prompts: str = "Once upon a time|Tom and Lily went to the park"  # |-separated prompts
    max_new_tokens: int = 1200  # past block_size, so the window slides at least once at the default block sizes


def first_difference(tokens, other):
    """'identical', or the first generation step at which two greedy token sequences differ."""
    step = next((i for i, (a, b) in enumerate(zip(tokens, other)) if a != b), None)
    return "identical" if step is None else f"differ from generated token {step}"


def main(argv=None):
    config = parse_config(GreedyCheckConfig, argv, __doc__)
    import torch

    import sample

    float32_arithmetic_differs = False
    first_dtype_tokens = {}  # prompt -> (the first dtype, its cached greedy tokens)
    for dtype in config.dtypes.split(","):
        model, tokenizer = sample.load_model(config.out_dir, device=config.device, dtype=dtype)
        device = model.lm_head.weight.device
        for prompt in config.prompts.split("|"):
            idx = torch.tensor([sample.encode_prompt(tokenizer, prompt, model.config.block_size)], device=device)
            cached, uncached = [model.generate(idx, config.max_new_tokens, temperature=0, kv_cache=kv_cache)
                                [0, idx.size(1):].tolist() for kv_cache in (True, False)]
            print(f"{dtype:9} {device.type:5} {config.max_new_tokens} tokens after {prompt!r}: cached and uncached "
                  f"greedy tokens {first_difference(cached, uncached)}", flush=True)
            first_dtype, first_tokens = first_dtype_tokens.setdefault(prompt, (dtype, cached))
            if first_dtype != dtype:
                print(f"{'':15} cached greedy tokens of {first_dtype} and {dtype} "
                      f"{first_difference(first_tokens, cached)}", flush=True)
            float32_arithmetic_differs |= dtype in ("float32", "auto") and cached != uncached
    if float32_arithmetic_differs:
        sys.exit(1)


if __name__ == "__main__":
    run_main(main)
