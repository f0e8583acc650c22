"""Shared test settings."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

# a backbone small enough to build, run and save in about a second
SMALL_BACKBONE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    vision_hidden_size=32,
    vision_intermediate_size=64,
)
