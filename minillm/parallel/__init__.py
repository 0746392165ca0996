"""Parallel training from scratch: one file per idea (chapters 07-09).

`layout` lays ranks out on a (pipeline, data, tensor) grid; `launch` starts real processes with
torch.distributed (gloo on CPUs, NCCL on GPUs); the other modules build on both.
"""
