"""HDF5 shards: a data set packed once into a few large files, read fast on every rank.

    hpc.shards.ShardDataset(shard_dir)          # torch Dataset; h5py opened lazily per worker
    hpc.shards.DistributedShardSampler(...)     # per-epoch shuffle, aspect groups, equal iterations
    hpc.shards.writer.pack_rank_shards(...)     # used by ``megdet pack``

The file layout is in ``hpc.shards.writer``, the manifest in ``hpc.shards.manifest``; docs/shards.md
explains the choices.
"""
from hpc.shards.manifest import ShardError, read_manifest
from hpc.shards.reader import LANDSCAPE, PORTRAIT, CorruptRecordError, ShardDataset, decode_image
from hpc.shards.sampler import DistributedShardSampler

__all__ = ["CorruptRecordError", "DistributedShardSampler", "LANDSCAPE", "PORTRAIT", "ShardDataset", "ShardError",
           "decode_image", "read_manifest"]
