"""Which images each rank reads, batch by batch: ``DistributedShardSampler``.

    sampler = DistributedShardSampler(dataset.aspect_groups, batch_size=2, rank=comm.rank,
                                      world_size=comm.size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=4, collate_fn=list)
    sampler.set_epoch(*divmod(iteration, sampler.iterations_per_epoch))   # resume at ``iteration``
    for epoch in ...: sampler.set_epoch(epoch); for batch in loader: ...

The rules, every epoch, from nothing but (seed, epoch) (and the rank, for own-shards mode):
  1. Shuffle the images: all of them (the default), or with ``shard_of`` only this rank's own:
     shard s belongs to rank s % world_size, so a rank reads only its own files.
  2. Split the shuffled images by aspect group, keeping their order, and cut each group into batches
     of ``batch_size``: a batch is all landscape or all portrait. A group's last, short batch is
     completed with that group's first images again.
  3. Shuffle the batches, so groups mix over the epoch.
  4. Every rank runs the same number of iterations: by default the ranks deal one shared list of
     batches (iteration t on rank r gets batch t * world_size + r), cycled up to a multiple of
     world_size; in own-shards mode each rank cycles its own list up to the longest rank's.
An epoch therefore visits every image at least once; the few repeats complete the last batches.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch.utils.data

from hpc.errors import UserError


class DistributedShardSampler(torch.utils.data.Sampler):
    """Yields this rank's batches (lists of dataset indices) for the current epoch.

    aspect_groups: int [N] group of each image (``ShardDataset.aspect_groups``). batch_size: images
    per rank per iteration. rank, world_size: this rank and the number of ranks. seed: shuffle seed,
    the same on every rank. shard_of: int [N] shard of each image (``ShardDataset.shard_of``) to keep
    each rank on its own shards; None to shuffle across all of them.
    """

    def __init__(self, aspect_groups: Sequence[int], *, batch_size: int, rank: int, world_size: int,
                 seed: int = 0, shard_of: Optional[Sequence[int]] = None):
        if batch_size < 1:
            raise ValueError(f"Invalid batch_size: {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"Invalid rank/world_size: {rank}/{world_size}")
        self.aspect_groups = np.asarray(aspect_groups)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.shard_of = None if shard_of is None else np.asarray(shard_of)
        if self.shard_of is not None:
            if len(self.shard_of) != len(self.aspect_groups):
                raise ValueError(f"Invalid shard_of: {len(self.shard_of)} entries for {len(self.aspect_groups)} images")
            num_shards = int(self.shard_of.max()) + 1 if len(self.shard_of) else 0
            if num_shards < world_size:
                raise UserError(f"Invalid shard count for own-shards sampling: {num_shards} shards for "
                                f"{world_size} ranks; repack with 'megdet pack --shards N' with N >= {world_size} "
                                f"(a multiple of it keeps the ranks even)")
        self.iterations_per_epoch = self._iterations_per_epoch()
        self.epoch, self.start_iteration = 0, 0

    def _rank_members(self, rank: int) -> np.ndarray:
        """Indices that rank ``rank`` draws from (own-shards mode), ascending."""
        return np.flatnonzero(self.shard_of % self.world_size == rank)

    def _batch_count(self, members: np.ndarray) -> int:
        _, counts = np.unique(self.aspect_groups[members], return_counts=True)
        return int(sum(math.ceil(count / self.batch_size) for count in counts))

    def _iterations_per_epoch(self) -> int:
        if self.shard_of is None:
            return math.ceil(self._batch_count(np.arange(len(self.aspect_groups))) / self.world_size)
        counts = [self._batch_count(self._rank_members(rank)) for rank in range(self.world_size)]
        if 0 in counts and max(counts) > 0:
            raise UserError(f"Invalid shards for own-shards sampling: rank {counts.index(0)} of {self.world_size} "
                            f"owns no images; repack with 'megdet pack --shards N', N a multiple of {self.world_size}")
        return max(counts)

    def set_epoch(self, epoch: int, start_iteration: int = 0) -> None:
        """Shuffle for ``epoch``; the next pass starts at iteration ``start_iteration`` of it."""
        if not 0 <= start_iteration <= self.iterations_per_epoch:
            raise ValueError(f"Invalid start_iteration: {start_iteration} (epoch has {self.iterations_per_epoch})")
        self.epoch, self.start_iteration = epoch, start_iteration

    def _grouped_batches(self, order: np.ndarray, rng: np.random.Generator) -> List[np.ndarray]:
        """``order`` cut into single-group batches (rule 2), in shuffled order (rule 3)."""
        batches = []
        for group in np.unique(self.aspect_groups[order]):
            members = order[self.aspect_groups[order] == group]
            count = math.ceil(len(members) / self.batch_size)
            batches.extend(np.resize(members, count * self.batch_size).reshape(count, self.batch_size))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _rank_batches(self) -> List[np.ndarray]:
        """This rank's batches for the whole current epoch."""
        total = self.iterations_per_epoch
        if self.shard_of is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            batches = self._grouped_batches(rng.permutation(len(self.aspect_groups)), rng)
            return [batches[(t * self.world_size + self.rank) % len(batches)] for t in range(total)]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        batches = self._grouped_batches(rng.permutation(self._rank_members(self.rank)), rng)
        return [batches[t % len(batches)] for t in range(total)] if batches else []

    def __len__(self) -> int:
        return self.iterations_per_epoch - self.start_iteration

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self._rank_batches()[self.start_iteration:]:
            yield batch.tolist()
