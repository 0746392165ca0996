"""The one place that knows how ranks are laid out for 3D parallelism.

Ranks form a grid of shape (pipeline, data, tensor), tensor fastest: ranks that share a tensor-
parallel group are neighbours (on one machine, where their frequent all-reduces are cheapest),
pipeline stages are furthest apart (they only pass activations to the next stage). Every group is
derived from this grid, e.g. BLOOM-176B's 384 GPUs: `Layout(tensor=4, pipeline=12, data=8)`.
"""

from __future__ import annotations

from dataclasses import dataclass

from minillm.errors import InputError, require_positive


@dataclass(frozen=True)
class Coords:
    pipeline: int
    data: int
    tensor: int


@dataclass(frozen=True)
class Layout:
    tensor: int = 1
    pipeline: int = 1
    data: int = 1

    def __post_init__(self) -> None:
        for name in ("tensor", "pipeline", "data"):
            require_positive(getattr(self, name), f"{name}-parallel size", integer=True)

    @classmethod
    def for_world(cls, world_size: int, *, tensor: int = 1, pipeline: int = 1) -> Layout:
        """The layout of `world_size` ranks with the given tensor and pipeline sizes; the rest
        is data parallelism. Refuses sizes that do not divide the world."""
        require_positive(world_size, "world_size", integer=True)
        if world_size % (tensor * pipeline):
            raise InputError(
                f"world size {world_size} is not divisible by tensor ({tensor}) x pipeline "
                f"({pipeline}) = {tensor * pipeline}; choose sizes whose product divides it"
            )
        return cls(tensor=tensor, pipeline=pipeline, data=world_size // (tensor * pipeline))

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data

    def coords(self, rank: int) -> Coords:
        """Where `rank` sits on the grid."""
        if not 0 <= rank < self.world_size:
            raise InputError(f"rank {rank} is outside the world of {self.world_size} ranks")
        return Coords(
            pipeline=rank // (self.data * self.tensor),
            data=rank // self.tensor % self.data,
            tensor=rank % self.tensor,
        )

    def rank(self, coords: Coords) -> int:
        return (coords.pipeline * self.data + coords.data) * self.tensor + coords.tensor

    def groups(self, kind: str) -> list[list[int]]:
        """Every group of one kind ("tensor", "data" or "pipeline"): the ranks that differ only in
        that coordinate. Each rank is in exactly one group of each kind."""
        if kind not in ("tensor", "data", "pipeline"):
            raise InputError(f"unknown group kind {kind!r}; choose tensor, data or pipeline")
        seen: dict[tuple, list[int]] = {}
        for rank in range(self.world_size):
            c = self.coords(rank)
            key = tuple(getattr(c, k) for k in ("pipeline", "data", "tensor") if k != kind)
            seen.setdefault(key, []).append(rank)
        return list(seen.values())

    def group_of(self, rank: int, kind: str) -> list[int]:
        return next(group for group in self.groups(kind) if rank in group)

    def check_model(
        self, *, n_head: int, n_layer: int, batch_size: int = 1, micro_batches: int = 1
    ) -> None:
        """Refuse, before any process starts, a layout the model cannot be split over."""
        if n_head % self.tensor:
            raise InputError(
                f"{n_head} attention heads cannot be split over tensor-parallel size "
                f"{self.tensor}: choose a tensor size that divides the head count"
            )
        if n_layer < self.pipeline:
            raise InputError(
                f"{n_layer} layers are fewer than the {self.pipeline} pipeline stages: every stage "
                "needs at least one layer"
            )
        if batch_size % micro_batches:
            raise InputError(
                f"batch size {batch_size} is not divisible into {micro_batches} micro-batches"
            )
        if batch_size % self.data:
            raise InputError(
                f"batch size {batch_size} cannot be shared evenly by {self.data} data-parallel "
                "ranks"
            )

    def describe(self) -> str:
        return (
            f"{self.world_size} ranks = tensor {self.tensor} x pipeline {self.pipeline} x data "
            f"{self.data}"
        )

    def new_groups(self, rank: int) -> dict:
        """This rank's torch.distributed process groups, one per kind. Every rank must call this
        (torch.distributed creates groups collectively, in the same order everywhere)."""
        import torch.distributed as dist

        mine = {}
        for kind in ("tensor", "data", "pipeline"):
            for ranks in self.groups(kind):
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = group
        return mine
