"""Launch configurations of the RNN kernels and the limits of what one program can hold.

Dimensions: B batch, H hidden. One place declares the block sizes and warps each kernel launches
with; the perf tooling tunes within these spaces.
"""
import torch
import triton

# Largest H whose whole W_hh one program of the sequence kernel keeps on chip, by element size:
# W_hh is BLOCK_H^2 elements held across the loop, plus its copy in the dot-operand layout.
# Conservative until measured on a GPU (16-bit W_hh at H = 256 is 128 KB).
SEQUENCE_MAX_H = {8: 64, 4: 128, 2: 128}

# tl.dot on a GPU needs every dimension >= 16, so batch tiles are padded up to it.
MIN_DOT = 16


def sequence_fits(hidden_size: int, dtype: torch.dtype) -> bool:
    """Whether one program of the sequence kernel can hold W_hh for this size and dtype."""
    return hidden_size <= SEQUENCE_MAX_H[dtype.itemsize]


def batch_block(batch: int, cap: int = 64) -> int:
    return min(cap, max(MIN_DOT, triton.next_power_of_2(batch)))


def sequence_config(batch: int, hidden: int) -> dict:
    block_h = max(MIN_DOT, triton.next_power_of_2(hidden))
    return {"BLOCK_B": batch_block(batch, cap=32 if block_h > 128 else 64), "BLOCK_H": block_h,
            "num_warps": 4 if block_h <= 64 else 8}


def step_config(batch: int, hidden: int) -> dict:
    block_n = min(64, max(MIN_DOT, triton.next_power_of_2(hidden)))
    return {"BLOCK_B": batch_block(batch), "BLOCK_N": block_n, "BLOCK_K": min(block_n, 32),
            "num_warps": 4}
