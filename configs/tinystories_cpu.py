"""
A model that learns to tell simple stories on a laptop CPU (2 cores) in about 15 minutes.

    python prepare.py --tokenizer=bpe:4096 --data_dir=data/tinystories-bpe4096
    python train.py configs/tinystories_cpu.py
    python sample.py --out_dir=out-cpu --prompt "Once upon a time"

A 4,096-token vocabulary instead of GPT-2's 50,257: with GPT-2 tokens the LM head alone would be 87% of a model
this size's compute.
"""
out_dir = "out-cpu"
data_dir = "data/tinystories-bpe4096"
device = "cpu"
compile = "False"
eval_interval = 100
eval_tokens = 81920  # 320 windows of 256 tokens per split
log_interval = 20

n_layer = 4
n_head = 4
n_embd = 192
block_size = 256
dropout = 0.0

batch_size = 16
total_batch_size = 8192  # tokens per step: 2 micro-steps of 16 x 256
learning_rate = 2e-3
min_lr = 2e-4
warmup_iters = 50
max_iters = 700
beta2 = 0.99
