"""
Train a GPT on the token streams written by prepare.py. The whole trainer is this one file, read top to bottom:
config, model, data, optimizer and schedule, evaluation, training loop.

    python train.py                                      # the default recipe, for one GPU
    python train.py configs/tinystories_cpu.py           # a small model that learns on a laptop CPU
    python train.py --n_layer=4 --batch_size=16 --compile=False
    python train.py --init_from=resume                   # continue from out_dir/ckpt.pt
    torchrun --standalone --nproc_per_node=8 train.py    # data-parallel on 8 GPUs

Importing this file has no side effects: sample.py, export.py and the tests use GPT, get_batch and friends.
"""

import contextlib
import ctypes
import dataclasses
import errno
import functools
import json
import math
import os
import random
import re
import shutil
import signal
import time
from dataclasses import dataclass

from cli import (UserError, first_line, interrupt_in_one_line, lock_folder, parse_config, print_config, run_main,
                 stdout_to_devnull)

if __name__ == "__main__":
    interrupt_in_one_line()  # while torch loads

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from prepare import file_sha256  # noqa: E402

# -----------------------------------------------------------------------------
# config


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out"  # checkpoints (ckpt.pt), log.jsonl and loss.png go here
    data_dir: str = "data/tinystories"  # train.bin, val.bin and meta.json written by prepare.py
    init_from: str = "scratch"  # 'scratch' or 'resume' (from out_dir/ckpt.pt)
    overwrite: bool = False  # start over in an out_dir that holds a checkpoint: ckpt.pt, log.jsonl etc. are replaced
    eval_interval: int = 500  # evaluate, log and checkpoint every this many iterations
    log_interval: int = 10  # print a progress line every this many iterations
    eval_tokens: int = 1048576  # tokens per split in each evaluation: evenly spaced windows, the same in every run
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # save at every eval; False keeps only the best val loss
    plot: bool = True  # redraw out_dir/loss.png at every eval
    wandb_log: bool = False  # also log to Weights & Biases (pip install wandb); WANDB_MODE=offline keeps it local
    wandb_project: str = "slm"  # the wandb project
    wandb_run_name: str = ""  # the wandb run's name; empty means out_dir's folder name
    # data
    batch_size: int = 64  # sequences per micro-step (per GPU); lower it when memory runs out
    block_size: int = 512  # context length in tokens
    total_batch_size: int = 131072  # tokens per optimizer step; gradient accumulation makes up what batch_size lacks
    gradient_accumulation_steps: int = 0  # micro-steps per optimizer step over all GPUs; 0 derives it from the above
    # model
    n_layer: int = 8  # transformer blocks
    n_head: int = 8  # attention heads
    n_embd: int = 512  # width of the residual stream
    dropout: float = 0.0  # 0 for pretraining; try 0.1 when overfitting a small dataset
    bias: bool = False  # biases in Linear and LayerNorm layers (GPT-2 had them)
    gelu: str = "tanh"  # GPT-2's tanh approximation, or exact (erf): faster on a CPU; export.py matches either
    # optimizer, learning-rate schedule and how long to train
    optimizer: str = "muon"  # muon (Muon: the blocks' matrices; AdamW: embeddings, head, gains, biases) or adamw
    learning_rate: float = 1e-3  # AdamW's peak learning rate, reached after warmup
    muon_lr: float = 0.0  # Muon's peak learning rate, in AdamW's units (torch's match_rms_adamw); 0 = learning_rate
    max_iters: int = 5000  # optimizer steps in total (ignored with --max_minutes)
    max_minutes: float = 0.0  # train for this many minutes of training time instead (not exactly reproducible)
    weight_decay: float = 0.1  # decoupled weight decay on matrices and embeddings only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    muon_momentum: float = 0.95  # Muon's (Nesterov) momentum
    grad_clip: float = 1.0  # clip the gradient norm to this; 0 disables
    decay_lr: bool = True  # warmup, then decay the learning rate; False: the peak from step 0 (nanoGPT's meaning)
    lr_schedule: str = "cosine"  # cosine (over max_iters) or wsd (warmup, stable, then linear decay over decay_frac)
    warmup_iters: int = 200  # linear warmup steps
    lr_decay_iters: int = 0  # step at which the decay reaches min_lr; 0 means max_iters; unused with --max_minutes
    decay_frac: float = 0.2  # wsd: the last fraction of the run (steps, or minutes with --max_minutes) that decays
    min_lr: float = 1e-4  # floor of the decay (AdamW's; Muon's is as far below its peak), at most learning_rate
    # system
    device: str = "auto"  # auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps
    dtype: str = "auto"  # auto (GPU: bf16, else float16; CPU: bf16 if faster; MPS: float32), float32, bfloat16, float16
    compile: bool | str = "auto"  # torch.compile the model: auto (on for CUDA), True or False
    seed: int = 1337  # seeds init, batch order and dropout (under DDP each rank takes its part of every batch)
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 looks it up (GPU; unknown: no MFU) or times a matmul (CPU)


# The default recipe, from FLOPs arithmetic. Goal: val loss <= 1.30 on TinyStories with GPT-2 tokens in <= 15 min on
# one H100 (989 TFLOP/s dense bf16).
# - Model 8 layers x 512 wide: 12 * 8 * 512^2 = 25.2M parameters in the blocks, plus a 50304 x 512 = 25.8M tied
#   embedding that is also the LM head. Training costs 6 * 51M + 12 * n_layer * block_size * n_embd = 331 MFLOP/token.
# - Measured on an H200 with bf16 and torch.compile: 38% MFU, 1.14M tokens/s, 115 ms per step of 131K tokens.
# - 5000 steps x (64 x 512 x 4 = 131K tokens) = 655M tokens, about 1.4 epochs of TinyStories' 472M training tokens,
#   in 655M / 1.14M = 10 min, leaving room for compilation and evaluation inside 15 minutes. The val loss it reaches
#   on the full dataset has not been measured yet.
# - Muon (the default optimizer) orthogonalises each block matrix every step: 5 Newton-Schulz iterations of three
#   matmuls, 2 * (2 * 512^2 * n + 512^3) FLOPs each for a 512 x n matrix (q, k and v as three), ~40 GFLOP per layer,
#   0.3 TFLOP per step against 131K x 331M = 43 TFLOP of training: +0.7%, in bf16 on the GPU. Per step it learned far
#   more than AdamW on the CPU recipe (1.332 against 1.403 bits/byte after 200 steps, learning rate as AdamW's), so it
#   replaces AdamW at the same steps; --optimizer=adamw gives the 2022 recipe back. With --max_minutes=10 the steps
#   follow the clock.


def eval_iters_as_tokens(eval_iters, config):
    if eval_iters < 1:
        raise UserError(f"--eval_iters must be at least 1, got {eval_iters}")
    eval_tokens = eval_iters * config.batch_size * config.block_size
    return {"eval_tokens": eval_tokens}, (f"--eval_iters={eval_iters} became --eval_tokens={eval_tokens} "
                                          f"({eval_iters} batches of {config.batch_size} x {config.block_size} tokens)")


def init_from_as_nanogpt(init_from, config):
    if init_from.startswith("gpt2"):
        raise UserError(f"--init_from={init_from}: OpenAI's GPT-2 weights are not loaded here; train from scratch "
                        "(--init_from=scratch) or continue a run of ours (--init_from=resume)")
    return {"init_from": init_from}, None


# nanoGPT's train.py flags whose name or values differ here: name -> (type, translate(value, config) -> (our settings,
# a note)), applied by parse_config to flags and config files alike. nanoGPT's other flags mean the same here (README:
# Coming from nanoGPT).
NANOGPT_FLAGS = {
    "eval_iters": (int, eval_iters_as_tokens),
    "dataset": (str, lambda name, config: ({"data_dir": os.path.join("data", name)},
                                           f"--dataset={name} became --data_dir={os.path.join('data', name)}")),
    "init_from": (str, init_from_as_nanogpt),
    "backend": (str, lambda backend, config: ({}, f"--backend={backend} is not needed: under torchrun train.py picks "
                                                  "nccl on GPUs and gloo on CPUs")),
}


def validate(config):
    """Reject settings that would silently train the wrong thing, before any work is done."""
    c = config
    problems = []
    if c.init_from not in ("scratch", "resume"):
        problems.append(f"--init_from must be 'scratch' or 'resume', got {c.init_from!r}")
    if not 0 <= c.seed < 10**8:  # generators are seeded with seed * 1,000,003 + an epoch or step: < 2**64
        problems.append(f"--seed must be from 0 to 99,999,999, got {c.seed}")
    if c.overwrite and (c.init_from == "resume" or c.eval_only):
        problems.append("--overwrite=True starts a new run over the checkpoint in out_dir: it goes with neither "
                        "--init_from=resume nor --eval_only")
    for name in ("batch_size", "block_size", "total_batch_size", "n_layer", "n_head", "n_embd",
                 "eval_tokens", "eval_interval", "log_interval"):
        if getattr(c, name) < 1:
            problems.append(f"--{name} must be at least 1, got {getattr(c, name)}")
    if c.gradient_accumulation_steps < 0:
        problems.append(f"--gradient_accumulation_steps must be 0 (derive it) or more, got "
                        f"{c.gradient_accumulation_steps}")
    if c.n_head >= 1 and c.n_embd % c.n_head:
        problems.append(f"--n_embd={c.n_embd} must be a multiple of --n_head={c.n_head}")
    if not 0 <= c.dropout < 1:
        problems.append(f"--dropout must be in [0, 1), got {c.dropout}")
    if c.learning_rate <= 0:
        problems.append(f"--learning_rate must be above 0, got {c.learning_rate}")
    problems += [f"--{name} must be 0 or more, got {getattr(c, name)}"
                 for name in ("max_iters", "warmup_iters", "grad_clip") if getattr(c, name) < 0]
    if c.weight_decay < 0:
        problems.append(f"--weight_decay must be 0 (none) or more, got {c.weight_decay}")
    if not (0 <= c.beta1 < 1 and 0 <= c.beta2 < 1):
        problems.append(f"--beta1 and --beta2 must be in [0, 1), got {c.beta1} and {c.beta2}")
    if c.gelu not in ("tanh", "exact"):
        problems.append(f"--gelu must be tanh or exact, got {c.gelu!r}")
    if c.optimizer not in ("muon", "adamw"):
        problems.append(f"--optimizer must be muon or adamw, got {c.optimizer!r}")
    if c.muon_lr < 0 or not 0 <= c.muon_momentum < 1:
        problems.append("--muon_lr must be >= 0 (0 = --learning_rate) and --muon_momentum in [0, 1)")
    if not c.max_minutes >= 0:  # (also catches nan)
        problems.append(f"--max_minutes must be 0 (train --max_iters steps) or more, got {c.max_minutes}")
    if c.lr_schedule not in ("cosine", "wsd"):
        problems.append(f"--lr_schedule must be cosine or wsd, got {c.lr_schedule!r}")
    if not 0 < c.decay_frac <= 1:
        problems.append(f"--decay_frac must be in (0, 1], got {c.decay_frac}")
    if c.decay_lr:
        if c.min_lr > c.learning_rate:
            problems.append(f"--min_lr={c.min_lr:g} is above --learning_rate={c.learning_rate:g}, so the learning "
                            "rate would rise during 'decay'; lower --min_lr")
        if c.min_lr < 0:
            problems.append(f"--min_lr must be 0 or more (the floor of the decay), got {c.min_lr}")
        if c.lr_decay_iters < 0 or 0 < c.lr_decay_iters < c.warmup_iters:
            problems.append(f"--lr_decay_iters={c.lr_decay_iters} must be 0 (= max_iters) or at least "
                            f"--warmup_iters={c.warmup_iters}")
    if c.peak_flops < 0:
        problems.append(f"--peak_flops must be 0 (look it up or measure it) or more, got {c.peak_flops}")
    if c.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {c.dtype!r}")
    if str(c.compile).lower() not in ("auto", "true", "false"):
        problems.append(f"--compile must be auto, True or False, got {c.compile!r}")
    if problems:
        raise UserError("; ".join(problems))


# -----------------------------------------------------------------------------
# model


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257  # the tokenizer's; the embedding is padded up to a multiple of 64
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True
    gelu: str = "tanh"  # GPT-2's tanh approximation, or exact (erf); checkpoints from before this setting are tanh


ARCHITECTURE = ("n_layer", "n_head", "n_embd", "block_size", "bias", "gelu")  # the model's shape: TrainConfig's too


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's always has one)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


# Attention kernels for generation. Not cuDNN's: it builds an execution plan for every new sequence length, and the
# context grows by one token per step: bf16 sampling on an H200 ran at 26 tokens/s with it and 250 without.
DECODE_ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """Keys and values of every position seen so far, preallocated, so that each new token costs one position."""

    def __init__(self, config, batch_size, device, dtype):
        shape = (config.n_layer, batch_size, config.n_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0  # positions filled


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if kv_cache is not None:
            start = kv_cache.pos
            assert start == 0 or T == 1, "the cache takes a whole prompt first, then one token at a time"
            kv_cache.k[self.layer_idx, :, :, start:start + T] = k
            kv_cache.v[self.layer_idx, :, :, start:start + T] = v
            k = kv_cache.k[self.layer_idx, :, :, :start + T]
            v = kv_cache.v[self.layer_idx, :, :, :start + T]
        # flash attention where the device has it; a single new token may attend to every cached position. (An `if`,
        # not is_causal=T > 1: under torch.compile with dynamic shapes, T > 1 is symbolic and SDPA needs a plain bool.)
        causal = True if T > 1 else False  # noqa: SIM210
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        # GPT-2's tanh form, or the exact one (transformers has both, so an export matches either exactly). PyTorch's
        # CPU kernel for the exact one takes half the time: a CPU recipe step 3-5% faster.
        self.gelu = nn.GELU(approximate="tanh" if config.gelu == "tanh" else "none")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None):
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class ChunkedLMHeadLoss(torch.autograd.Function):
    """
    cross_entropy(x @ weight.T, targets), a block of rows at a time, with the gradients computed during the forward.
    With a 50K vocabulary the full logits of one batch and their gradient take hundreds of MB; allocating and freeing
    them every step costs more than the arithmetic on a CPU. Here only one block of logits ever exists. Used on a CPU in
    eager float32; torch.compile fuses the plain cross-entropy itself.
    Passes over the logits cost about as much as the head's matmuls on a CPU, so there is one softmax (one exp) per
    block: the loss is -log of the target's probability, and the 1/n of the mean rides in the matmuls. (A token the
    model gives less than the dtype's smallest normal, 1e-38 in float32, counts as 87.3 nats; its gradient is exact.)
    Under torch.no_grad (evaluation) it only sums the loss (with_grads=False): 1.3x faster than the full logits
    and F.cross_entropy for the CPU recipe's model, and for one with GPT-2's vocabulary.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, rows_per_chunk, with_grads=True):
        n = x.size(0)
        grad_x, grad_weight = (torch.empty_like(x), torch.zeros_like(weight)) if with_grads else (None, None)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        tiny = torch.finfo(x.dtype).tiny
        for i in range(0, n, rows_per_chunk):
            xc, tc = x[i:i + rows_per_chunk], targets[i:i + rows_per_chunk]
            probs = torch.softmax(xc @ weight.T, dim=1)
            loss -= probs.gather(1, tc[:, None]).clamp_(min=tiny).log_().sum()
            if not with_grads:
                continue
            probs[torch.arange(len(tc), device=x.device), tc] -= 1.0  # d(loss)/d(logits) = softmax - one_hot
            grad_x[i:i + rows_per_chunk].addmm_(probs, weight, beta=0, alpha=1.0 / n)  # beta=0: never reads empty_like
            grad_weight.addmm_(probs.T, xc, alpha=1.0 / n)
        if with_grads:
            ctx.save_for_backward(grad_x, grad_weight)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # a multiple of 64 rows makes the head's matmuls faster; the padding ids are never targets or samples
        padded_vocab = (config.vocab_size + 63) // 64 * 64
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(padded_vocab, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, padded_vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: https://paperswithcode.com/method/weight-tying
        self.chunked_loss = False  # train.py turns this on for a CPU in eager float32
        # blocks of 2M logits (8 MB) and at least 128 rows, so a block stays in cache and its matmuls stay efficient:
        # 512 rows at a 4,096 vocabulary, 128 at GPT-2's (a training step 12% faster than with 256 rows; 64 were slower)
        self.chunked_loss_rows = max(128, 2 ** 21 // padded_vocab)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: residual projections scaled down by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameters; the position embedding is left out by default, as it does no matmul work."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def forward(self, idx, targets=None, kv_cache=None):
        B, T = idx.size()
        start = kv_cache.pos if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T
        if targets is None:  # generating: only the last position's logits are needed
            return self.lm_head(x[:, -1:, :]), None
        if self.chunked_loss:
            loss = ChunkedLMHeadLoss.apply(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1),
                                           self.chunked_loss_rows, torch.is_grad_enabled())
            return None, loss
        logits = self.lm_head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def flops_per_token(self):
        """Training FLOPs per token: 6 per parameter (forward + backward) plus attention (PaLM paper, appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s as a fraction of the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, kv_cache=True,
                        generator=None):
        """
        Yield the next token of every sequence in idx (B, T), max_new_tokens times. With kv_cache each step runs one
        position; when the context is full it is cut to its last half and re-encoded, since learned absolute
        positions cannot slide. Without it every step re-runs the whole window, the cost nanoGPT pays for every token.
        """
        block_size = self.config.block_size
        # Both paths see the same window, so greedy output does not depend on kv_cache: the last `window` tokens,
        # which grows by one per step and, when the next token would not fit, drops to the last block_size // 2 + 1.
        window = min(idx.size(1), block_size)
        cache = None
        for step in range(max_new_tokens):
            if step:
                window = window + 1 if window < block_size else block_size // 2 + 1
            with sdpa_kernel(DECODE_ATTENTION_BACKENDS):
                if not kv_cache:
                    logits, _ = self(idx[:, -window:])
                elif cache is None or window < cache.pos + 1:  # first step, or the window slid: encode it afresh
                    if cache is None:
                        param = self.lm_head.weight
                        cache = KVCache(self.config, idx.size(0), param.device, param.dtype)
                    cache.pos = 0  # the stale entries past pos are never read
                    logits, _ = self(idx[:, -window:], kv_cache=cache)
                else:
                    logits, _ = self(idx[:, -1:], kv_cache=cache)
            logits = logits[:, -1, :self.config.vocab_size]  # never sample a padding id
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token[:, None]), dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, **kwargs):
        """idx (B, T) followed by max_new_tokens sampled tokens; keyword arguments as for generate_tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, **kwargs))
        return torch.cat([idx] + [t[:, None] for t in new], dim=1)


def sample_next_token(logits, temperature=1.0, top_k=0, top_p=1.0, generator=None):
    """One token per row of logits (B, V): greedy at temperature 0, else from the top_k / top_p filtered softmax."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # Measured from the largest logit, which becomes 0, a tiny temperature sends the others to -inf: greedy, where
    # dividing first overflowed to inf - inf = nan. (Below float32's smallest normal number it would round to 0.)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    ids = None  # once logits are cut down to candidates: the token id of each column
    if top_k and top_k < logits.size(-1):
        # only the k likeliest can be drawn, so draw among just those: a 50K-way draw costs ~1 ms on a CPU
        logits, ids = torch.topk(logits, top_k, dim=-1)  # sorted, most likely first
    if top_p < 1.0:  # nucleus: the smallest set of most likely tokens whose probability reaches top_p
        if ids is None:
            logits, ids = torch.sort(logits, descending=True, dim=-1)
        probs = logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        logits = logits.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


# -----------------------------------------------------------------------------
# data


def load_meta(data_dir):
    """
    data_dir/meta.json, checked at start-up against the files it describes: train.bin and val.bin of the size it
    gives (a truncated or half-copied file would otherwise fail, or train on part of the data, hours later), and
    tokenizer.json of the content it records.
    """
    path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(path):
        raise UserError(f"no dataset at {data_dir} (meta.json is missing): run prepare.py first, "
                        f"or point --data_dir at its output")
    rebuild = f"re-run prepare.py to rebuild {data_dir}"
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        meta = json.loads(text)
    except (OSError, ValueError) as e:  # (JSONDecodeError and UnicodeDecodeError are ValueErrors)
        reason = "empty" if not os.path.getsize(path) else first_line(e)[:80]
        raise UserError(f"{path} is damaged or unreadable ({reason}): {rebuild}") from None
    try:
        itemsize = {"uint16": 2, "uint32": 4}[meta["dtype"]]
        files = {split: (os.path.join(data_dir, meta[split]["file"]), int(meta[split]["tokens"]))
                 for split in ("train", "val")}
        int(meta["vocab_size"]), int(meta["eot_token"]), str(meta["tokenizer"]), meta["val"]["bytes"]
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} is not a complete meta.json of prepare.py: {rebuild}") from None
    for split, (bin_path, tokens) in files.items():
        size = os.path.getsize(bin_path) if os.path.isfile(bin_path) else None
        if size is None:
            raise UserError(f"{bin_path} is missing: {rebuild}")
        if tokens < 1 or size != tokens * itemsize:
            raise UserError(f"{bin_path} holds {size:,} bytes but meta.json says {tokens:,} {meta['dtype']} tokens "
                            f"({tokens * itemsize:,} bytes): the data folder is damaged or half-copied; {rebuild}")
    if meta.get("tokenizer_file"):
        tokenizer_path = os.path.join(data_dir, meta["tokenizer_file"])
        if not os.path.isfile(tokenizer_path):
            raise UserError(f"{tokenizer_path} is missing: {rebuild}")
        if meta.get("tokenizer_sha256") and file_sha256(tokenizer_path) != meta["tokenizer_sha256"]:
            raise UserError(f"{tokenizer_path} is not the tokenizer that made this data (its sha256 differs from "
                            f"meta.json's): {rebuild}")
    return meta


def check_split_length(split, tokens, block_size):
    if tokens < block_size + 1:
        raise UserError(f"the {split} split has {tokens} tokens, fewer than block_size + 1 = {block_size + 1}: "
                        f"use a smaller --block_size or more data")


def train_window_starts(seed, first, count, split_tokens, block_size):
    """
    Where training windows first .. first + count - 1 start, counted from the start of training. Each epoch visits
    every block_size-aligned window of the split once, in a shuffled order and shifted by a random offset, so every
    token (but for up to two windows' worth at the split's ends, which one window per epoch leaves room for the
    offset) is trained on equally often and in a different position each epoch. Random windows drawn with replacement
    leave e^-k of the tokens unseen after k epochs and show others twice as often as the mean: over 4 epochs of the
    CPU recipe, 0.926 and 0.932 bits/byte (two seeds) against 0.908 and 0.905 in epochs (benchmarks/README.md).
    A function of (seed, window index) only, so a resumed run, and a run on any number of processes, sees the same
    windows.
    """
    windows = max(1, (split_tokens - 1) // block_size - 1)  # per epoch, leaving room for the offset
    epoch, index = np.divmod(first + np.arange(count), windows)
    starts = np.empty(count, dtype=np.int64)
    for e in np.unique(epoch):  # one epoch, or two where a batch straddles their boundary
        offset, order = epoch_order(seed, int(e), windows, split_tokens, block_size)
        starts[epoch == e] = offset + order[index[epoch == e]] * block_size
    return starts


@functools.lru_cache(maxsize=2)
def epoch_order(seed, epoch, windows, split_tokens, block_size):
    """One epoch's offset and shuffled window order (cached: every batch of the epoch asks for it again)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    offset = int(torch.randint(min(block_size, split_tokens - windows * block_size), (), generator=generator))
    return offset, torch.randperm(windows, generator=generator).numpy()


def get_batch(data_dir, meta, split, starts, block_size, device):
    """
    The windows of block_size + 1 tokens at starts: x is each window's first block_size tokens, y the same shifted
    by one. The memmap is opened anew for every batch: a long-lived one keeps every page it has touched resident, so
    memory would grow with the step count (nanoGPT issue #287).
    """
    info = meta[split]
    path = os.path.join(data_dir, info["file"])
    data = np.memmap(path, dtype=np.dtype(meta["dtype"]), mode="r")
    if len(data) != info["tokens"]:  # prepare.py rebuilt the folder under a running job: other data, maybe other ids
        raise UserError(f"{path} changed during the run: it holds {len(data):,} tokens, and {info['tokens']:,} when "
                        "the run started. Let prepare.py finish, then continue with --init_from=resume (or rebuild "
                        "data into another --data_dir while training)")
    windows = torch.from_numpy(data[np.asarray(starts)[:, None] + np.arange(block_size + 1)].astype(np.int64))
    if device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
        windows = windows.pin_memory().to(device, non_blocking=True)
    else:
        windows = windows.to(device)
    return windows[:, :-1], windows[:, 1:]


# -----------------------------------------------------------------------------
# optimizer and learning-rate schedule


def configure_optimizers(model, config, device_type, muon_ns_dtype=torch.bfloat16):
    """
    The optimizers, each with its parameter groups, every parameter in exactly one of them.
      adamw: AdamW for everything; weight decay only on matrices and embeddings (>= 2-D), never on gains and biases.
      muon:  Muon for the 2-D matrices inside the blocks (attention and MLP weights), which it orthogonalises (query,
             key and value each on its own); AdamW as above for the rest: the embedding (which is also the LM head),
             the positions, gains and biases.
    The schedule sets their learning rates at every step (set_lr).
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    use_muon = config.optimizer == "muon"
    matrices = [p for name, p in named if use_muon and p.dim() == 2 and name.startswith("transformer.h.")]
    in_muon = {id(p) for p in matrices}
    rest = [p for _, p in named if id(p) not in in_muon]
    groups = [
        {"params": [p for p in rest if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type in ("cuda", "cpu")  # one kernel for all parameters; PyTorch has it on these devices
    adamw = torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=fused)
    optimizers = [adamw]
    if use_muon:
        stacked_qkv = [p for name, p in named if name.endswith("attn.c_attn.weight")]
        optimizers.append(Muon(matrices, lr=peak_lr(config, Muon), weight_decay=config.weight_decay,
                               momentum=config.muon_momentum, adjust_lr_fn="match_rms_adamw", ns_dtype=muon_ns_dtype,
                               stacked_qkv=stacked_qkv))
    return optimizers


class Muon(torch.optim.Muon):
    """
    torch.optim.Muon with two changes; the update is otherwise torch's, line for line, and so is the state
    (momentum_buffer), so checkpoints are the same either way.
    - Newton-Schulz iterations in ns_dtype. torch runs them in bfloat16, which suits GPUs and CPUs with bf16
      arithmetic, but a CPU without it emulates bfloat16 matmuls at about 1 GFLOP/s against 50-110 in float32: for a
      4 x 192 model's matrices, 10 s per step in bfloat16 against 0.07 s in float32 on a 2-core AMD EPYC without
      avx512_bf16.
    - stacked_qkv: weights that stack the query, key and value matrices (c_attn) are orthogonalised as three matrices,
      not as one, as modded-nanogpt does: they are three maps, and one orthogonalisation would balance each against
      the others. Newton-Schulz then costs 18 C^3 FLOPs per iteration for c_attn instead of 14 C^3, about 0.5% of a CPU
      recipe step; at its 913 steps, 0.964 bits/byte against 0.969 (benchmarks/README.md).
    """

    def __init__(self, params, ns_dtype=torch.bfloat16, stacked_qkv=(), **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype
        self.stacked_qkv = {id(p) for p in stacked_qkv}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, weight_decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                matrices = 3 if id(p) in self.stacked_qkv else 1
                update = torch.cat([orthogonalize(u, group["ns_coefficients"], group["ns_steps"], group["eps"],
                                                  self.ns_dtype) for u in update.chunk(matrices)])
                p.mul_(1 - lr * weight_decay)
                rms_scale = 0.2 * math.sqrt(max(p.size(0) // matrices, p.size(1)))  # match_rms_adamw: AdamW's size
                p.add_(update, alpha=-lr * rms_scale)
        return loss


def orthogonalize(g, coefficients, steps, eps, dtype):
    """
    Newton-Schulz iterations towards the nearest semi-orthogonal matrix of g (roughly U V^T of its SVD), as in
    torch.optim.Muon, in dtype. The quintic's coefficients push singular values into about [0.7, 1.2] in a few steps.
    """
    a, b, c = coefficients
    if dtype == torch.float16:  # its range is narrow: scaled first, or a small gradient's entries flush to zero
        g = g / g.norm().clamp(min=eps)
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T  # the Gram matrix of the shorter side is the cheaper one
    x = x / x.norm().clamp(min=eps)  # spectral norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if g.size(0) > g.size(1) else x).to(g.dtype)


def muon_ns_dtype(device, dtype):
    """bfloat16 (torch's choice) where the training arithmetic is bfloat16 or the device is a GPU with bf16, float16
    on a GPU without it (V100, T4: its tensor cores, and more mantissa bits), else float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def lr_scale(step, progress, config):
    """
    The learning rate of this step as a fraction of the peak. progress is the share of the run that will be done
    when this step ends: steps / max_iters, or with --max_minutes training time / budget.
      warmup: linear over warmup_iters steps, starting above zero;
      cosine: by steps, nanoGPT's: down to min_lr at lr_decay_iters, then min_lr (with --max_minutes: by progress);
      wsd:    stable at the peak, then linear down to min_lr over the last decay_frac of the run. It fits a budget
              known only as a time: the decay starts when the clock says so.
    """
    c = config
    if not c.decay_lr:
        return 1.0
    floor = c.min_lr / c.learning_rate
    warmup = (step + 1) / (c.warmup_iters + 1) if step < c.warmup_iters else 1.0
    if c.lr_schedule == "cosine" and not c.max_minutes:
        decay_iters = c.lr_decay_iters or c.max_iters
        if step < c.warmup_iters:
            return warmup
        if step >= decay_iters:
            return floor
        cosine_progress = (step - c.warmup_iters) / max(1, decay_iters - c.warmup_iters)
        return floor + 0.5 * (1.0 + math.cos(math.pi * cosine_progress)) * (1 - floor)
    if c.lr_schedule == "wsd":
        decay = floor + (1 - floor) * min(1.0, max(0.0, 1 - progress) / c.decay_frac)
    else:
        decay = floor + 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))) * (1 - floor)
    return min(warmup, decay)  # (a budget that ends during warmup still ends at min_lr)


def get_lr(step, config, progress=None):
    """AdamW's learning rate at this step (Muon's is the same fraction of its own peak)."""
    if progress is None:
        progress = (step + 1) / max(1, config.lr_decay_iters or config.max_iters)
    return config.learning_rate * lr_scale(step, progress, config)


def peak_lr(config, optimizer_class):
    """An optimizer's peak learning rate: --muon_lr for Muon (0 = --learning_rate), --learning_rate for AdamW."""
    return (config.muon_lr or config.learning_rate) if optimizer_class is Muon else config.learning_rate


def set_lr(optimizers, config, scale):
    """Each optimizer's peak, from the config (not the checkpoint: a resumed run may change it), times scale."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = peak_lr(config, type(optimizer)) * scale


# -----------------------------------------------------------------------------
# evaluation


def eval_starts(split_tokens, block_size, eval_tokens):
    """
    Where the evaluation's windows start: evenly spaced over the split, so they are the same at every evaluation and
    in every run, whatever the seed or batch size, and figures compare across runs and resumes. Evenly spaced windows
    are a stratified sample: 256 of them (the CPU recipe's 65,536 tokens) put its val figure within +-0.004 bits/byte
    (one sd) of the whole split's, where 256 random windows scatter +-0.010 (benchmarks/README.md). When eval_tokens
    covers the split, the windows tile it: every token but a tail shorter than a window is evaluated once.
    """
    n_windows = max(1, min(eval_tokens // block_size, (split_tokens - 1) // block_size))
    return np.arange(n_windows) * ((split_tokens - 1) // n_windows)


@torch.no_grad()
def estimate_loss(model, batch_fn, meta, eval_tokens, block_size, batch_size, autocast):
    """Mean loss of each split over its evaluation windows (eval_starts), batch_size windows at a time."""
    model.eval()
    losses = {}
    for split in ("train", "val"):
        starts = eval_starts(meta[split]["tokens"], block_size, eval_tokens)
        total = 0.0
        for i in range(0, len(starts), batch_size):
            x, y = batch_fn(split, starts=starts[i:i + batch_size])
            with autocast:
                loss = model(x, y)[1]
            total = total + loss.float() * len(x)  # on the device: one sync per split, not per batch
        losses[split] = float(total) / len(starts)
    model.train()
    return losses


def bits_per_byte(loss, meta):
    """Val loss in nats/token -> bits per UTF-8 byte of text: comparable across tokenizers and vocabularies."""
    val = meta["val"]
    return loss / math.log(2) * val["tokens"] / max(1, val["bytes"])


def log_row(line):
    """A row of log.jsonl, or None for a blank line or a row cut short (a crash or a full disk while appending)."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) and isinstance(row.get("iter"), int) and "val_loss" in row else None


def plot_losses(log_path, png_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path, encoding="utf-8", errors="replace") as f:
        rows = [row for row in map(log_row, f) if row]
    tokens = [r["tokens"] / 1e6 for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(tokens, [r["train_loss"] for r in rows], label="train")
    ax.plot(tokens, [r["val_loss"] for r in rows], label="val")
    ax.set_xlabel("tokens (millions)")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path + ".tmp.png", dpi=100)
    plt.close(fig)
    os.replace(png_path + ".tmp.png", png_path)


# -----------------------------------------------------------------------------
# checkpoints


def save_checkpoint(path, checkpoint):
    """Write to a temporary file and rename it into place: an interrupted save never leaves a half-written ckpt.pt."""
    tmp = path + ".tmp"
    try:
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, a second Ctrl-C: the last good ckpt.pt stays, and no half-written .tmp
        if os.path.lexists(tmp):
            os.remove(tmp)
        if isinstance(e, RuntimeError):  # how torch.save reports a failed write ("unexpected pos ...")
            raise UserError(f"saving {path} failed ({first_line(e)[:100]}): check the free space; "
                            f"the last {os.path.basename(path)} is kept, continue it with --init_from=resume") from None
        raise


def strip_prefixes(state_dict):
    """Keys as the bare model names them: torch.compile adds '_orig_mod.', DDP adds 'module.'."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("_orig_mod.", "module.")):  # in any order: DDP of a compiled model gives both
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def no_checkpoint(path):
    return UserError(f"no checkpoint at {path}: train one with train.py, or point --out_dir at its folder")


def load_checkpoint(path, map_location="cpu", mmap=False):
    """
    The checkpoint at path, checked. mmap=True reads tensors only when they are used: sample.py never touches the
    optimizer state, two thirds of the file, and copies the weights out at once. (Only for such a use: a tensor still
    viewing the mapped file keeps it open, and on Windows an open file cannot be replaced by the next checkpoint.)
    """
    if not os.path.exists(path):
        raise no_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        raise UserError(f"{path} is not a readable slm checkpoint ({type(e).__name__}: damaged, cut short, or another "
                        "program's): restore it from a copy, or train a new one") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_args" not in checkpoint:
        raise UserError(f"{path} is not an slm checkpoint (no model/model_args): point --out_dir at a folder train.py "
                        "wrote")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} was written by an incompatible version of train.py (checkpoint version "
                        f"{checkpoint.get('version')}, this code reads {CHECKPOINT_VERSION}): retrain, or use the "
                        f"train.py that wrote it")
    checkpoint["model"] = strip_prefixes(checkpoint["model"])
    return checkpoint


def model_from_checkpoint(checkpoint):
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    model.load_state_dict(checkpoint["model"])
    return model


CHECKPOINT_VERSION = 1


def rng_state(device):
    return {
        "python": list(random.getstate()[1]),
        "numpy": [torch.from_numpy(np.random.get_state()[1].astype(np.int64)), *np.random.get_state()[2:]],
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],  # the training GPU's only
    }


def set_rng_state(state, device):
    random.setstate((3, tuple(state["python"]), None))
    key, *rest = state["numpy"]
    np.random.set_state(("MT19937", key.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"]  # older checkpoints held every GPU's state (and failed to resume with fewer GPUs), now one
    index = device.index or 0
    if cuda and device.type == "cuda":
        torch.cuda.set_rng_state(cuda[index] if index < len(cuda) else cuda[0], device)


# -----------------------------------------------------------------------------
# devices


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device={name} but this PyTorch sees no CUDA GPU: use --device=cpu, or install a CUDA "
                        "build of torch (see README)")
    if device.type == "cuda" and (device.index or 0) >= (count := torch.cuda.device_count()):
        raise UserError(f"--device={name} but this machine has {count} CUDA GPU(s), numbered from 0: use "
                        f"--device=cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device={name} but MPS is not available here: use --device=cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def pick_dtype(name, device):
    if name == "auto":
        if device.type == "cuda":
            return "bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else "float16"
        if device.type == "cpu":
            return None  # decided once the model exists: cpu_bfloat16_is_faster times its training passes
        return "float32"
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError("this GPU has no bfloat16: use --dtype=float16 (with loss scaling) or --dtype=float32")
    return name


@functools.lru_cache(maxsize=None)  # the dtype probe and the MFU peak both ask for bf16's 256²: measured once
def matmul_flops(dtype, size, repeats=3):
    """FLOP/s of a size x size matmul on the CPU in dtype, the best of a few (the global RNG is left alone)."""
    a = torch.rand(size, size, generator=torch.Generator().manual_seed(0)).to(dtype)
    a @ a
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def cpu_bfloat16_is_faster(model, rows, compile_model=False, resumed_dtype=None):
    """
    Whether bf16 autocast trains this model faster than float32 on this CPU: measured, not guessed from its name.
    First a 256² matmul in each dtype (a few ms): bf16 must run it 1.25x as fast. A CPU without bf16 arithmetic
    emulates it at about 1 GFLOP/s against 60-90 in float32, and float32 wins outright. Where bf16 matmuls are faster
    (AMX: an earlier CPU recipe's step took half the time), the model's own forward and backward passes on `rows`
    sequences decide, each dtype with the LM-head loss it would train with (float32 the chunked one), since a step is
    more than its matmuls. The passes are eager even for --compile=True, and leave out the optimizer (whose
    Newton-Schulz runs in bf16 too when bf16 is chosen): both lean towards float32. bf16 must take 10% less time: in
    a close call float32, the exact one, stays. A resumed run keeps a float32 or bf16 dtype it was trained in (where
    bf16 is fast here), as a resume is exact only in that dtype and a second timing could land the other way.
    Returns (bf16 is faster, what was measured).
    """
    bf16_flops, fp32_flops = matmul_flops(torch.bfloat16, 256), matmul_flops(torch.float32, 256)
    if bf16_flops < 1.25 * fp32_flops:
        return False, (f"bfloat16 matmuls ran at {bf16_flops / 1e9:.1f} GFLOP/s against {fp32_flops / 1e9:.1f} "
                       "in float32")
    if resumed_dtype in ("float32", "bfloat16"):
        return resumed_dtype == "bfloat16", "the dtype of the run being resumed"
    idx = torch.randint(model.config.vocab_size, (rows, model.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    bf16_s = training_pass_s(model, idx, torch.autocast("cpu", dtype=torch.bfloat16), chunked_loss=False)
    fp32_s = training_pass_s(model, idx, contextlib.nullcontext(), chunked_loss=not compile_model)
    return bf16_s < 0.9 * fp32_s, (f"a training pass of {rows} x {model.config.block_size} tokens took "
                                   f"{bf16_s * 1e3:.0f} ms in bfloat16 against {fp32_s * 1e3:.0f} ms in float32")


def training_pass_s(model, idx, autocast, chunked_loss, repeats=2):
    """Seconds of the fastest of a few forward and backward passes (after one to warm up), with or without the
    chunked loss. The model, its RNG and its gradients (none) are left as they were."""
    was_chunked, model.chunked_loss, best = model.chunked_loss, chunked_loss, math.inf
    with torch.random.fork_rng(devices=[]):  # dropout's draws must not move the run's RNG
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with autocast:
                _, loss = model(idx, idx)
            loss.backward()
            best = min(best, time.perf_counter() - t0) if i else best
    model.zero_grad(set_to_none=True)
    model.chunked_loss = was_chunked
    return best


def peak_flops_of(device, dtype):
    """Dense peak FLOP/s for MFU: a table for common GPUs, a quick measured matmul elsewhere."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if "MIG" in name:
            return 0.0  # a slice of the GPU: its share of the peak is not known here
        # dense tensor-core peaks, bf16/fp16 (fp32 accumulate) and float32 (TF32; V100 and T4 have none)
        table = {"H100 PCIe": (756e12, 378e12), "H100 NVL": (835e12, 418e12), "H100": (989e12, 495e12),
                 "H200 NVL": (835e12, 418e12), "H200": (989e12, 495e12), "GH200": (989e12, 495e12),
                 "B200": (2250e12, 1100e12), "A100": (312e12, 156e12), "L40S": (362e12, 183e12), "L40": (181e12, 90e12),
                 "L4": (121e12, 60e12), "A10": (125e12, 62e12), "4090": (165e12, 83e12), "3090": (71e12, 36e12),
                 "V100": (125e12, 16e12), "T4": (65e12, 8e12)}
        for key in sorted(table, key=len, reverse=True):  # whole words, longest first: "H100 PCIe" before "H100"
            if re.search(rf"\b{key}\b", name):  # and "L40" is not "L40S", "A10" not "A100" or "A10G"
                return table[key][dtype == "float32"]
        return 0.0
    if device.type != "cpu":
        return 0.0  # no table for this device: MFU is left out unless --peak_flops is given
    # a large matmul in the dtype the model computes in (autocast's for bf16/fp16): this CPU's practical peak. Where
    # that dtype is emulated (bf16 on a CPU without bf16 arithmetic: about 1 GFLOP/s), the hardware's peak is still
    # its float32 one (the model's smaller matmuls beat a 1024² probe: MFU read 361%), and a small probe says so in
    # milliseconds, where the large one would take 12 s.
    fp32_peak, probe_dtype = matmul_flops(torch.float32, 2048), getattr(torch, dtype)
    if dtype == "float32" or matmul_flops(probe_dtype, 256) < fp32_peak / 4:
        return fp32_peak
    return max(matmul_flops(probe_dtype, 1024), fp32_peak)


def keep_freed_memory():
    """
    glibc hands large freed buffers back to the kernel and maps them anew on the next step: with a 50K-vocabulary
    head that is a third of the CPU time in page faults. Keeping freed memory for reuse gives the same results
    sooner (BASELINES.md: -35% per step).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, Windows, musl): nothing to tune
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)


# -----------------------------------------------------------------------------
# training loop


def start_wandb(config, run_id):
    """A Weights & Biases run, new or (run_id from the checkpoint) the resumed one. wandb is imported only here."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb_log=True needs wandb: pip install wandb") from None
    name = config.wandb_run_name or os.path.basename(os.path.abspath(config.out_dir))
    try:
        return wandb.init(project=config.wandb_project, name=name, id=run_id, resume="allow" if run_id else None,
                          config=dataclasses.asdict(config))
    except wandb.errors.Error as e:  # no API key, the server unreachable...
        raise UserError(f"wandb could not start ({first_line(e)}): log in with `wandb login`, or log locally with "
                        "WANDB_MODE=offline, or drop --wandb_log") from None


def micro_steps_per_process(config, block_size, world_size):
    """
    Micro-steps per optimizer step: given (nanoGPT's --gradient_accumulation_steps), or as many as make
    --total_batch_size tokens, so that halving --batch_size after running out of memory keeps the step, and the recipe,
    the same. They count over all processes together and are shared out among them.
    """
    micro_tokens = config.batch_size * block_size
    if not config.gradient_accumulation_steps and config.total_batch_size % micro_tokens:
        raise UserError(f"--total_batch_size={config.total_batch_size} must be a multiple of --batch_size x "
                        f"block_size = {micro_tokens} (or set --gradient_accumulation_steps)")
    micro_steps = config.gradient_accumulation_steps or config.total_batch_size // micro_tokens
    if micro_steps % world_size:
        fits = [b for b in range(config.batch_size, 0, -1)
                if config.total_batch_size % (b * block_size * world_size) == 0]
        hint = f"; try --batch_size={fits[0]}" if fits and not config.gradient_accumulation_steps else ""
        raise UserError(f"{micro_steps} micro-steps per step must be a multiple of the number of processes "
                        f"({world_size}){hint}")
    return micro_steps // world_size


def check_out_dir(config, ckpt_path):
    """Refuse, before anything is written, an out_dir that cannot be written or whose checkpoint a new run would
    overwrite (nanoGPT overwrites it at the first evaluation: an afternoon of training lost to a forgotten flag)."""
    if os.path.exists(config.out_dir) and not os.path.isdir(config.out_dir):
        raise UserError(f"--out_dir={config.out_dir} is a file, not a folder: choose another --out_dir")
    if (os.path.exists(os.path.join(config.out_dir, "meta.json")) and not config.eval_only  # another data folder:
            and os.path.realpath(config.out_dir) != os.path.realpath(config.data_dir)):  # its tokenizer.json would go
        raise UserError(f"--out_dir={config.out_dir} holds prepared data (meta.json): give the run a folder of its "
                        "own, for example --out_dir=out")
    if config.init_from == "resume" and not os.path.exists(ckpt_path):  # (before a mistyped out_dir is made)
        raise no_checkpoint(ckpt_path)
    if config.init_from == "scratch" and os.path.exists(ckpt_path) and not config.overwrite:
        raise UserError(f"{ckpt_path} holds a trained checkpoint that a new run would replace: continue it with "
                        "--init_from=resume, choose another --out_dir, or start over with --overwrite=True (replaces "
                        "its ckpt.pt and log.jsonl)")
    if config.eval_only:
        return  # writes nothing
    probe = os.path.join(config.out_dir, f".write-test-{os.getpid()}")
    try:  # find out now, not at the first checkpoint
        os.makedirs(config.out_dir, exist_ok=True)
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --out_dir={config.out_dir} ({e.strerror}); choose a folder you can write "
                        "to") from None


def tokenizer_sha256(meta, folder):
    """The tokenizer's content hash: meta's, or for a meta.json from before it was recorded, that of the tokenizer
    file in folder (None for gpt2, whose ranks never change, or without the file)."""
    if meta.get("tokenizer_sha256"):
        return meta["tokenizer_sha256"]
    path = meta.get("tokenizer_file") and os.path.join(folder, meta["tokenizer_file"])
    return file_sha256(path) if path and os.path.isfile(path) else None


def loss_not_finite(loss, iter_num, ckpt_path):
    kept = (f"{ckpt_path} keeps the last good checkpoint" if os.path.exists(ckpt_path) else
            "no checkpoint was saved before it")
    return UserError(f"the loss became {loss} at iter {iter_num}; {kept}. Try a lower --learning_rate, or "
                     "--dtype=bfloat16/float32")


def restores_process_state(fn):
    """main() installs its own Ctrl-C and SIGTERM handlers and locks out_dir: whoever called it (a test, a notebook)
    gets its handlers back and the lock released, however it ends. main registers what to undo with on_exit."""
    @functools.wraps(fn)
    def wrapper(argv=None):
        saved = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with contextlib.ExitStack() as on_exit:
                return fn(argv, on_exit)
        finally:
            for signum, handler in saved.items():
                if handler is not None:  # (None: a handler not installed from Python, which stays)
                    signal.signal(signum, handler)
    return wrapper


@restores_process_state
def main(argv, on_exit):
    config = parse_config(TrainConfig, argv, __doc__, NANOGPT_FLAGS)
    validate(config)
    if config.eval_only:
        config.init_from = "resume"  # evaluating means evaluating the checkpoint in out_dir

    # one process per GPU under torchrun; a plain `python train.py` is a world of one
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if ddp:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if config.device not in ("auto", "cuda", "cpu"):
            raise UserError(f"under torchrun --device must be auto, cuda or cpu (each process takes GPU LOCAL_RANK), "
                            f"got {config.device!r}")
        if config.device in ("auto", "cuda") and torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        else:
            device = pick_device("cpu" if config.device == "auto" else config.device)
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None)
    else:
        device = pick_device(config.device)
        if device.type == "cuda" and device.index is not None:  # --device=cuda:1: synchronize() and the bf16 check
            torch.cuda.set_device(device)  # ask about the current GPU, which would otherwise stay GPU 0
    master = rank == 0
    dtype = pick_dtype(config.dtype, device)
    compile_model = str(config.compile).lower() == "true" or (str(config.compile).lower() == "auto"
                                                               and device.type == "cuda")
    if compile_model and device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            if str(config.compile).lower() == "true":
                raise UserError("torch.compile needs Triton, which this platform lacks: use --compile=False")
            if master:
                print("note: torch.compile is not available here (no Triton); running eagerly")
            compile_model = False
    stop_requested = []  # Ctrl-C, SIGTERM or a reader gone: the loop stops after its step, and saves

    def say(line):  # rank 0 reports; when stdout's reader has gone (train.py | head), the run stops as on Ctrl-C
        if master:
            try:
                print(line)
            except OSError:  # a closed pipe, or a full disk behind `> log`
                stdout_to_devnull()
                stop_requested.append("stdout failed")
    if master:
        print_config(config)
    if device.type == "cpu" and config.n_embd >= 512 and config.max_iters >= 1000:
        say("note: these are the GPU defaults; on a CPU try `python train.py configs/tinystories_cpu.py`")
    if config.decay_lr and not config.max_minutes and 0 < config.max_iters <= config.warmup_iters:
        say(f"note: --warmup_iters={config.warmup_iters} is not below --max_iters={config.max_iters}, so the whole run "
            "is warmup and the learning rate never reaches its peak; lower --warmup_iters")

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmuls left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    if device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(config.seed + rank)
    meta = load_meta(config.data_dir)
    if not meta.get("tokenizer_sha256") and tokenizer_sha256(meta, config.data_dir):  # data from an older prepare.py:
        meta["tokenizer_sha256"] = tokenizer_sha256(meta, config.data_dir)  # the checkpoint records it all the same
    ckpt_path = os.path.join(config.out_dir, "ckpt.pt")
    log_path = os.path.join(config.out_dir, "log.jsonl")
    check_out_dir(config, ckpt_path)  # before anything in out_dir is touched
    if master and not config.eval_only:  # two runs in one out_dir would write over each other's checkpoints
        lock = lock_folder(config.out_dir, f"another run is writing --out_dir={config.out_dir}: wait for it to finish, "
                                           "or give this one another --out_dir")
        if lock is not None:
            on_exit.callback(os.close, lock)

    # model, optimizer, loss scaler: fresh, or exactly as they were saved
    iter_num, best_val_loss, elapsed_before, train_s, wandb_run_id = 0, float("inf"), 0.0, 0.0, None
    resumed_dtype, budget_spent_s, tokens_before = None, 0.0, 0
    if config.init_from == "resume":
        checkpoint = load_checkpoint(ckpt_path)
        # the architecture is the checkpoint's, whatever the flags say; dropout, a training setting, is the flags'
        model_args = {**checkpoint["model_args"], "dropout": config.dropout}
        if checkpoint["model_args"]["dropout"] != config.dropout and not config.eval_only:
            say(f"dropout {checkpoint['model_args']['dropout']} -> {config.dropout} (--dropout)")
        # so the config saved with it (and shown by wandb and export.py's model card) describes this model
        architecture = {name: model_args.get(name, getattr(GPTConfig, name))  # (older checkpoints: the default)
                        for name in ARCHITECTURE}
        ignored = [f"--{name}={getattr(config, name)}" for name, value in architecture.items()
                   if getattr(config, name) != value]
        if ignored:
            say(f"the model is the checkpoint's ({', '.join(f'{k}={v}' for k, v in architecture.items())}): "
                f"{', '.join(ignored)} ignored")
        for name, value in architecture.items():
            setattr(config, name, value)
        if checkpoint["meta"].get("tokenizer") != meta.get("tokenizer"):
            raise UserError(f"{ckpt_path} was trained on {checkpoint['meta'].get('tokenizer')} tokens but "
                            f"{config.data_dir} holds {meta.get('tokenizer')} tokens: use the same --data_dir")
        trained_with = tokenizer_sha256(checkpoint["meta"], config.out_dir)
        data_made_with = tokenizer_sha256(meta, config.data_dir)
        if None not in (trained_with, data_made_with) and trained_with != data_made_with:
            raise UserError(f"{ckpt_path} was trained with another {meta['tokenizer']} tokenizer than the one that "
                            f"made {config.data_dir} (tokenizer sha256 {trained_with[:12]}... vs "
                            f"{data_made_with[:12]}...): the same ids mean other text. Use the --data_dir it was "
                            "trained on")
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        elapsed_before = checkpoint.get("elapsed_s", 0.0)
        train_s = checkpoint.get("train_s", 0.0)  # training time already spent, for --max_minutes
        budget_spent_s = checkpoint.get("budget_spent_s", 0.0)  # the largest budget it finished
        tokens_before = checkpoint["tokens"]  # trained on so far: where this run's windows continue the stream
        wandb_run_id = checkpoint.get("wandb_run_id")  # the resumed run logs into the same wandb run
        resumed_dtype = checkpoint.get("dtype")  # what it trained in: --dtype=auto keeps it (on a CPU, below)
        if config.dtype == "auto" and device.type == "cuda" and resumed_dtype == "float16":
            dtype = resumed_dtype  # and its loss scale: a bf16 GPU would otherwise switch a float16 run to bf16
            say(f"dtype auto: {dtype}, the dtype of the run being resumed")
        optimized_with = checkpoint["config"].get("optimizer", "adamw")  # (checkpoints from before Muon: adamw)
        if config.eval_only:
            config.optimizer = optimized_with
        elif optimized_with != config.optimizer:
            raise UserError(f"{ckpt_path} was trained with --optimizer={optimized_with}: resume with the same "
                            f"--optimizer={optimized_with}")
        say(f"resuming from {ckpt_path} at iter {iter_num}")
        if not config.max_minutes and not config.eval_only and iter_num >= config.max_iters:
            say(f"note: the run has done its --max_iters={config.max_iters} steps: raise --max_iters to train on")
    else:
        model_args = {**{name: getattr(config, name) for name in ARCHITECTURE}, "vocab_size": meta["vocab_size"],
                      "dropout": config.dropout}
    model = GPT(GPTConfig(**model_args))
    if config.init_from == "resume":
        model.load_state_dict(checkpoint["model"])
    model.to(device)
    block_size = model.config.block_size  # the checkpoint's when resuming, whatever --block_size says
    for split in ("train", "val"):  # now, not at the first evaluation
        check_split_length(split, meta[split]["tokens"], block_size)
    if dtype is None and config.eval_only and resumed_dtype is None:  # nothing to time: float32 reads exactly
        dtype = "float32"
    if dtype is None:  # --dtype=auto on a CPU: timed training passes decide, rank 0's for every process
        rows = min(config.batch_size, max(1, 4096 // block_size))
        bf16_faster, measured = (cpu_bfloat16_is_faster(model, rows, compile_model, resumed_dtype) if master
                                 else (False, ""))
        if ddp:
            choice = torch.tensor([float(bf16_faster)])
            torch.distributed.broadcast(choice, src=0)
            bf16_faster = choice.item() > 0
        dtype = "bfloat16" if bf16_faster else "float32"
        say(f"dtype auto: {dtype} ({measured})")
    say(f"device {device}, dtype {dtype}, compile {compile_model}, {world_size} process(es)")
    model.chunked_loss = device.type == "cpu" and not compile_model and dtype == "float32"
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.flops_per_token() / 1e6:.0f} MFLOP/token")
    grad_accum = 1 if config.eval_only else micro_steps_per_process(config, block_size, world_size)
    tokens_per_iter = grad_accum * world_size * config.batch_size * block_size
    resumed_at = iter_num  # a resume may change the tokens per step: its steps count on from tokens_before

    def tokens_seen(steps):
        return tokens_before + (steps - resumed_at) * tokens_per_iter
    if not config.eval_only:
        say(f"{grad_accum} micro-step(s) of {config.batch_size} x {block_size} per process: "
            f"{tokens_per_iter:,} tokens/iter")
    optimizers = configure_optimizers(model, config, device.type, muon_ns_dtype(device, dtype))
    say(f"optimizer {config.optimizer}: " + ", ".join(
        f"{type(o).__name__} for {sum(p.numel() for g in o.param_groups for p in g['params']) / 1e6:.2f}M parameters"
        for o in optimizers))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == "float16")  # fp16 needs loss scaling; bf16 does not
    if config.init_from == "resume":
        saved = checkpoint["optimizer"]
        for optimizer, state in zip(optimizers, saved if isinstance(saved, list) else [saved], strict=True):
            settings = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
            optimizer.load_state_dict(state)  # the moments, and the settings they were saved with,
            for group, setting in zip(optimizer.param_groups, settings):
                group.update(setting)  # which give way to this run's flags (--weight_decay, betas, momentum)
        if checkpoint["scaler"]:  # empty when the run that saved it did not scale (bf16, fp32)
            scaler.load_state_dict(checkpoint["scaler"])
        set_rng_state(checkpoint["rng"], device)  # rank 0's; the other ranks draw their own dropout masks again
        if rank:
            torch.manual_seed(config.seed + rank + 1_000_003 * iter_num)
        del checkpoint
    if master and config.overwrite and os.path.exists(ckpt_path):  # asked to start over: the old run goes now,
        os.remove(ckpt_path)  # so that its checkpoint never meets this run's tokenizer.json or log
    if master and meta.get("tokenizer_file") and not config.eval_only:
        # sample.py needs only out_dir: the tokenizer travels with ckpt.pt. A checkpoint already there was made with
        # this very tokenizer (a resume checked it above; a new run refused, or removed it for --overwrite), so
        # this never puts another tokenizer beside a checkpoint.
        dst = os.path.join(config.out_dir, meta["tokenizer_file"])
        shutil.copyfile(os.path.join(config.data_dir, meta["tokenizer_file"]), dst + ".tmp")
        os.replace(dst + ".tmp", dst)
    elif master and config.init_from == "scratch" and os.path.exists(os.path.join(config.out_dir, "tokenizer.json")):
        os.remove(os.path.join(config.out_dir, "tokenizer.json"))  # an earlier run's: GPT-2 tokens need none
    wandb_run = start_wandb(config, wandb_run_id) if master and config.wandb_log and not config.eval_only else None

    raw_model = model  # the bare GPT: its state_dict has no compile/DDP prefixes
    if compile_model:
        say("compiling the model (takes a minute)...")
        model = torch.compile(model)
    train_model = model  # evaluation runs on model; training on train_model, which syncs gradients under DDP
    if ddp:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    autocast = (torch.autocast(device_type=device.type, dtype=getattr(torch, dtype)) if dtype != "float32"
                else contextlib.nullcontext())
    peak_flops = config.peak_flops or (0.0 if config.eval_only else peak_flops_of(device, dtype))
    # A shared CPU's speed moves (a busy neighbour on the host): measured while slow, the peak makes MFU read over
    # 100% once it speeds up (132% seen on a 2-core VM). Then it is measured again, a few times at most, off the clock.
    peak_probes_left = 3 if device.type == "cpu" and not config.peak_flops and world_size == 1 else 0

    def batch(split, starts):
        return get_batch(config.data_dir, meta, split, starts, block_size, device)

    def checkpoint_now(val_loss=float("nan"), training_s=None):  # val_loss of exactly these weights, when evaluated
        return {
            "version": CHECKPOINT_VERSION, "model": raw_model.state_dict(),
            "optimizer": [optimizer.state_dict() for optimizer in optimizers],
            "scaler": scaler.state_dict(), "iter_num": iter_num, "best_val_loss": best_val_loss, "val_loss": val_loss,
            "model_args": model_args, "config": dataclasses.asdict(config), "dtype": dtype, "meta": meta,
            "rng": rng_state(device),
            "elapsed_s": elapsed_before + time.time() - t_start,
            "train_s": train_s + time.time() - t_last if training_s is None else training_s,
            "budget_spent_s": max(budget_spent_s, budget_s if done else 0.0),  # the largest budget it finished
            "tokens": tokens_seen(iter_num), "wandb_run_id": wandb_run.id if wandb_run else wandb_run_id,
        }

    # Ctrl-C (or SIGTERM: a scheduler's or a container's stop) finishes the current step, saves a checkpoint and
    # exits; a second Ctrl-C stops at once. --eval_only has nothing to save: Ctrl-C stops it at once.
    interrupted = None

    def request_stop(signum, frame):
        stop_requested.append(signum)
        if not ddp:  # torchrun's agent repeats the signal to every worker: under DDP a repeat must not kill it
            signal.signal(signal.SIGINT, signal.default_int_handler)

    if not config.eval_only:
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
    # Under DDP the processes vote on stopping after every step, on a CPU (gloo) group and asynchronously: each
    # reads the previous step's vote, long since counted, so all stop after the same step, and no GPU waits for it
    stop_group = torch.distributed.new_group(backend="gloo") if ddp else None
    stop_vote, stop_counted = torch.zeros(1), None

    # How much of the run is done: steps out of max_iters, or with --max_minutes training time out of the budget.
    # Training time leaves out evaluations and, when compiling, the first step. The clock is read where the loop
    # syncs anyway, every log_interval steps (with a budget also 1, 2, 4, 8... steps after the start, so that a long
    # log_interval does not leave the schedule without a time per step), and the time per step is extrapolated in
    # between: so under DDP every process computes the same learning rate and stops after the same step, and the step
    # whose learning rate has reached min_lr is the last one.
    budget_s = 60 * config.max_minutes
    places = max(1, len(f"{config.max_minutes:g}".partition(".")[2]))  # progress in the budget's places: 0.15/0.15
    clock_iter, clock_s_per_iter = iter_num, 0.0  # the last reading (train_s is its time)

    def fraction_done(steps):  # of the schedule
        if budget_s:
            return (train_s + (steps - clock_iter) * clock_s_per_iter) / budget_s
        return steps / max(1, config.lr_decay_iters or config.max_iters)

    def finished(steps):  # a budget once finished stays so: the run stopped by the extrapolated clock, and the
        if budget_s:  # time read after its last step may fall a little short of the budget
            return budget_s <= budget_spent_s or fraction_done(steps) >= 1
        return steps >= config.max_iters

    def clock_due(steps):
        since = steps - first_iter
        return steps % config.log_interval == 0 or bool(budget_s and since & (since - 1) == 0)

    t_start = t_last = time.time()
    first_iter, iters_since_log = iter_num, 0
    done = finished(iter_num)
    # a new run starts a new log; a resumed one drops the rows it will redo (its evaluation at iter_num, if it makes
    # that one again, and any after it)
    if master and os.path.exists(log_path) and not config.eval_only:
        redone = iter_num % config.eval_interval == 0 or done
        with open(log_path, encoding="utf-8", errors="replace") as f:
            rows = [(line, log_row(line)) for line in f]
        kept = [line for line, row in rows
                if row and (row["iter"] < iter_num or row["iter"] == iter_num and not redone)]
        with open(log_path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(log_path + ".tmp", log_path)
    while True:
        scale = lr_scale(iter_num, fraction_done(iter_num + 1), config)  # (the share done when this step ends)
        set_lr(optimizers, config, scale)
        lr = config.learning_rate * scale  # AdamW's, shown on this step's progress line

        evaluating = iter_num % config.eval_interval == 0 or done or config.eval_only
        if evaluating:
            if device.type == "cuda":
                torch.cuda.synchronize()  # the steps still queued on the GPU are training time
            t_eval = time.time()
            training_s = train_s + t_eval - t_last  # training time up to this evaluation
        if master and evaluating:
            losses = estimate_loss(model, batch, meta, config.eval_tokens, block_size, config.batch_size, autocast)
            val_bpb = bits_per_byte(losses["val"], meta)
            say(f"eval iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}, "
                f"val ppl {math.exp(min(losses['val'], 50)):.2f}, val bits/byte {val_bpb:.4f}")
            if config.eval_only:
                break
            if not all(math.isfinite(v) for v in losses.values()):
                raise loss_not_finite(losses["val"], iter_num, ckpt_path)
            # the learning rate of the step that led here, as its progress line shows it (at iter 0: the first's)
            last_lr = get_lr(max(iter_num - 1, 0), config, fraction_done(max(iter_num, 1)))
            row = {"iter": iter_num, "tokens": tokens_seen(iter_num), "train_loss": losses["train"],
                   "val_loss": losses["val"], "val_bpb": val_bpb, "lr": last_lr,
                   "elapsed_s": round(elapsed_before + time.time() - t_start, 3), "train_s": round(training_s, 3)}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            if wandb_run:
                wandb_run.log(row, step=iter_num)
            if config.plot:
                plot_losses(log_path, os.path.join(config.out_dir, "loss.png"))
            if iter_num > 0 and (losses["val"] < best_val_loss or config.always_save_checkpoint):
                best_val_loss = min(best_val_loss, losses["val"])
                save_checkpoint(ckpt_path, checkpoint_now(losses["val"], training_s))
        if evaluating:  # evaluation time is not training time: the clock pauses, on every process
            if ddp and not config.eval_only:  # the others wait here for rank 0, not in the next step's all-reduce,
                torch.distributed.barrier()  # where their clocks would run
            t_last += time.time() - t_eval
        if done or config.eval_only:
            break

        # one optimizer step. Each micro-batch's windows follow from (seed, its place in the run's stream of
        # windows): a resumed run sees the same batches, and so does a run on a different number of GPUs.
        for micro_step in range(grad_accum):
            if ddp:  # average gradients across processes once, on the last micro-step
                train_model.require_backward_grad_sync = micro_step == grad_accum - 1
            first = tokens_seen(iter_num) // block_size + (rank * grad_accum + micro_step) * config.batch_size
            x, y = batch("train", train_window_starts(config.seed, first, config.batch_size, meta["train"]["tokens"],
                                                      block_size))
            with autocast:
                loss = train_model(x, y)[1]  # (the logits go now: at GPT-2's vocabulary they are gigabytes)
            scaler.scale(loss / grad_accum).backward()
        if config.grad_clip:
            for optimizer in optimizers:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        for optimizer in optimizers:
            scaler.step(optimizer)
        scaler.update()
        model.zero_grad(set_to_none=True)
        iter_num += 1
        iters_since_log += 1
        done = finished(iter_num)
        if compile_model and iter_num == first_iter + 1:  # this step compiled the model: not training time
            loss.item()
            t_last, iters_since_log = time.time(), 0

        read_clock = iters_since_log and (clock_due(iter_num) or done)
        if read_clock:
            loss_now = loss.item()  # a host-device sync, so only once per log_interval (and a few times at the start)
            if not math.isfinite(loss_now):
                raise loss_not_finite(loss_now, iter_num, ckpt_path)
            now = time.time()
            dt = (now - t_last) / iters_since_log
            train_s += now - t_last
            t_last, iters_since_log = now, 0
            clock_iter, clock_s_per_iter = iter_num, dt
        if read_clock and (iter_num % config.log_interval == 0 or done):
            tokens_per_s = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_s / world_size, peak_flops) if peak_flops else 0.0
            if mfu > 1 and peak_probes_left:
                peak_probes_left -= 1
                matmul_flops.cache_clear()  # (measured afresh)
                peak_flops = max(peak_flops, peak_flops_of(device, dtype))
                mfu = raw_model.estimate_mfu(tokens_per_s / world_size, peak_flops)
                t_last = time.time()  # (the probe is not training time)
            if budget_s:
                eta, so_far = max(0.0, budget_s - train_s), f" ({train_s / 60:.{places}f}/{config.max_minutes:g} min)"
            else:
                eta, so_far = (config.max_iters - iter_num) * dt, f"/{config.max_iters}"
            say(f"iter {iter_num}{so_far} | loss {loss_now:.4f} | lr {lr:.2e} | {dt * 1000:.1f} ms/iter | "
                f"{tokens_per_s:,.0f} tok/s | {f'mfu {mfu * 100:.1f}% | ' if peak_flops else ''}"
                f"eta {int(eta // 60)}m{int(eta % 60):02d}s")
            if wandb_run:
                wandb_run.log({"iter": iter_num, "tokens": tokens_seen(iter_num), "loss": loss_now, "lr": lr,
                               "tokens_per_s": tokens_per_s, **({"mfu": mfu} if peak_flops else {})}, step=iter_num)

        stop = bool(stop_requested)
        if ddp:  # every process must stop after the same step and read the same clock: they agree at each reading
            stop = False
            if stop_counted is not None:
                stop_counted.wait()
                stop = stop_vote.item() > 0
            if clock_due(iter_num):  # (stop is agreed already, by the vote)
                agreed = torch.tensor([train_s, clock_s_per_iter], dtype=torch.float64, device=device)
                torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
                train_s, clock_s_per_iter = agreed.tolist()  # all keep the agreed clock
            stop_counted = None
            if not stop:
                stop_vote.fill_(float(bool(stop_requested)))
                stop_counted = torch.distributed.all_reduce(stop_vote, op=torch.distributed.ReduceOp.MAX,
                                                            group=stop_group, async_op=True)
        if stop and not all(torch.isfinite(p).all() for p in raw_model.parameters()):
            raise loss_not_finite(float("nan"), iter_num, ckpt_path)  # never saved over the last good checkpoint
        if stop:
            interrupted = f"stopped at iter {iter_num}"
            if master:
                if config.always_save_checkpoint:
                    save_checkpoint(ckpt_path, checkpoint_now())
                    interrupted = f"saved {ckpt_path} at iter {iter_num}; continue with --init_from=resume"
                elif os.path.exists(ckpt_path):
                    interrupted = f"stopped at iter {iter_num}; {ckpt_path} keeps the best val loss"
                else:
                    interrupted = f"stopped at iter {iter_num}, before any checkpoint was saved"
            break
    if stop_counted is not None:  # the last step's vote, which every process cast
        stop_counted.wait()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)

    if wandb_run:
        wandb_run.finish()
    if ddp:
        torch.distributed.barrier()  # rank 0 may still be evaluating and saving: leave together
        torch.distributed.destroy_process_group()
    if interrupted:  # the run did not finish: exit code 130 (cli.run_main), so that scripts can tell
        raise KeyboardInterrupt(interrupted)


def main_with_memory_hint(argv=None):
    try:
        main(argv)
    except torch.OutOfMemoryError as e:
        what = first_line(e)[:200]
        raise UserError(f"out of GPU memory ({what}): lower --batch_size (gradient accumulation then makes up "
                        "--total_batch_size, so the step stays the same), or --block_size or the model size; or free "
                        "the GPU from other processes") from None
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            raise
        raise UserError(f"writing {e.filename or 'to --out_dir'} failed ({e.strerror}): free some space, then "
                        "continue with --init_from=resume (ckpt.pt is only ever replaced whole)") from None


if __name__ == "__main__":
    run_main(main_with_memory_hint)
