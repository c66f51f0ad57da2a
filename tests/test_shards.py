"""``hpc.shards`` reader and sampler: read-time failures, DataLoader workers, the sampler's rules."""
from __future__ import annotations

import json
import os
import pickle
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch.utils.data

from hpc.errors import UserError
from hpc.shards import LANDSCAPE, PORTRAIT, DistributedShardSampler, ShardDataset, ShardError
from hpc.shards.manifest import MANIFEST_NAME
from tests.test_pack import pack, subset


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """The first 24 VOC images (landscape and portrait) in 4 jpeg shards; tests copy it before damaging it."""
    root = tmp_path_factory.mktemp("packed")
    ann, images, _ = subset(root, "voc100", count=24)
    pack("--coco-json", ann, "--images", images, "--out", root / "shards", "--shards", "4")
    return root / "shards"


def copy_of(packed: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for path in packed.iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    return out


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_missing_truncated_or_corrupt_shards_name_the_file(packed, tmp_path):
    shards = copy_of(packed, tmp_path)
    manifest = json.loads((shards / MANIFEST_NAME).read_text())
    dataset = ShardDataset(str(shards))
    # flip a byte inside image 0 of shard 1: that record fails by name, the rest still read
    index = int(np.flatnonzero(dataset.shard_of == 1)[0])
    with h5py.File(shards / manifest["shards"][1]["file"], "r") as handle:
        data_start = handle["images/data"].id.get_offset()
    flip_byte(shards / manifest["shards"][1]["file"], data_start + int(dataset._offset[index]) + 100)
    reopened = ShardDataset(str(shards))
    corrupt = rf"Checksum mismatch: image id {int(dataset.image_ids[index])} in .*{manifest['shards'][1]['file']}"
    with pytest.raises(ShardError, match=corrupt):
        reopened[index]
    assert reopened[index + 1]["image"].ndim == 3
    with pytest.raises(ShardError, match=rf"Checksum mismatch: .*{manifest['shards'][1]['file']}"):
        ShardDataset(str(shards), verify_checksums=True)
    # the DataLoader fails the epoch instead of shortening it
    loader = torch.utils.data.DataLoader(reopened, batch_size=4, num_workers=2, collate_fn=list,
                                         multiprocessing_context="fork")
    with pytest.raises(ShardError, match="Checksum mismatch"):
        list(loader)

    last = shards / manifest["shards"][3]["file"]
    os.truncate(last, last.stat().st_size - 10)
    with pytest.raises(ShardError, match=rf"Truncated or changed shard: .*{last.name}"):
        ShardDataset(str(shards))
    last.unlink()
    with pytest.raises(ShardError, match=rf"Missing shard: .*{last.name}"):
        ShardDataset(str(shards))
    (shards / MANIFEST_NAME).unlink()
    with pytest.raises(ShardError, match="manifest.json does not exist"):
        ShardDataset(str(shards))


def test_dataloader_workers_open_their_own_handles(packed):
    """num_workers=2 with fork: the parent holds an open handle when the workers start."""
    dataset = ShardDataset(str(packed))
    in_parent = {i: dataset[i] for i in range(len(dataset))}
    assert dataset._handles  # opened lazily, in this process
    sampler = DistributedShardSampler(dataset.aspect_groups, batch_size=3, rank=1, world_size=2, seed=5)

    def collate_in_worker(records):  # runs in the worker: whose handles did it read with?
        return records, os.getpid(), dataset._pid

    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=2, collate_fn=collate_in_worker,
                                         multiprocessing_context="fork")
    for epoch in range(2):
        sampler.set_epoch(epoch)
        batches = list(loader)
        assert len(batches) == sampler.iterations_per_epoch
        workers = {worker for _, worker, _ in batches}
        assert len(workers) == 2 and os.getpid() not in workers
        assert all(worker == opened_by for _, worker, opened_by in batches)
        for indices, (records, _, _) in zip(sampler, batches):
            assert [r["image_id"] for r in records] == [in_parent[i]["image_id"] for i in indices]
            for i, record in zip(indices, records):
                np.testing.assert_array_equal(record["image"], in_parent[i]["image"])
                np.testing.assert_array_equal(record["boxes"], in_parent[i]["boxes"])
            assert len({int(dataset.aspect_groups[i]) for i in indices}) == 1
    spawned = pickle.loads(pickle.dumps(dataset))  # what a spawn worker receives: no handles
    assert spawned._handles == {} and spawned[0]["image_id"] == in_parent[0]["image_id"]


def test_dataset_exposes_sizes_groups_and_categories_without_decoding(packed):
    dataset = ShardDataset(str(packed))
    manifest = json.loads((packed / MANIFEST_NAME).read_text())
    assert [c["id"] for c in dataset.categories] == sorted(c["id"] for c in manifest["dataset"]["categories"])
    for index in range(len(dataset)):
        record = dataset[index]
        height, width = record["image"].shape[:2]
        assert tuple(dataset.image_sizes[index]) == (record["height"], record["width"]) == (height, width)
        assert dataset.aspect_groups[index] == (LANDSCAPE if width >= height else PORTRAIT)
    assert set(dataset.aspect_groups.tolist()) == {LANDSCAPE, PORTRAIT}
    assert Counter(dataset.shard_of.tolist()) == {s: m["num_images"] for s, m in enumerate(manifest["shards"])}


def random_groups(count: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random(count) < 0.3).astype(np.int8)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_sampler_ranks_cover_the_epoch_in_equal_single_group_batches(world_size):
    groups = random_groups(53, seed=world_size)
    samplers = [DistributedShardSampler(groups, batch_size=4, rank=r, world_size=world_size, seed=7)
                for r in range(world_size)]
    per_rank = [list(s) for s in samplers]
    assert len({len(batches) for batches in per_rank}) == 1
    assert all(len(batches) == len(s) == s.iterations_per_epoch for batches, s in zip(per_rank, samplers))
    seen = [i for batches in per_rank for batch in batches for i in batch]
    assert set(seen) == set(range(len(groups)))
    assert all(len(batch) == 4 and len(set(groups[batch].tolist())) == 1 for b in per_rank for batch in b)
    # padding is small: under a batch per group plus one batch per rank
    assert len(seen) - len(groups) < 2 * 4 + world_size * 4
    # deterministic from (seed, epoch); another epoch or seed shuffles differently
    again = DistributedShardSampler(groups, batch_size=4, rank=0, world_size=world_size, seed=7)
    assert list(again) == per_rank[0]
    again.set_epoch(1)
    assert list(again) != per_rank[0]
    assert list(DistributedShardSampler(groups, batch_size=4, rank=0, world_size=world_size, seed=8)) != per_rank[0]


def test_sampler_resumes_from_an_iteration():
    groups = random_groups(40, seed=1)
    sampler = DistributedShardSampler(groups, batch_size=2, rank=1, world_size=2, seed=3)
    epochs = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        epochs.append(list(sampler))
    per_epoch = sampler.iterations_per_epoch
    resumed = DistributedShardSampler(groups, batch_size=2, rank=1, world_size=2, seed=3)
    resumed.set_epoch(*divmod(per_epoch + 3, resumed.iterations_per_epoch))
    assert (resumed.epoch, len(resumed)) == (1, per_epoch - 3)
    assert list(resumed) == epochs[1][3:]
    resumed.set_epoch(2)
    assert len(list(resumed)) == per_epoch
    with pytest.raises(ValueError, match="Invalid start_iteration"):
        resumed.set_epoch(0, start_iteration=per_epoch + 1)


@pytest.mark.parametrize("world_size", [2, 4])
def test_sampler_keeps_each_rank_on_its_own_shards(world_size):
    shard_sizes = [7, 3, 9, 5, 8, 2, 6, 4][: 2 * world_size]  # uneven on purpose
    shard_of = np.repeat(np.arange(len(shard_sizes)), shard_sizes)
    groups = random_groups(len(shard_of), seed=2)
    samplers = [DistributedShardSampler(groups, batch_size=3, rank=r, world_size=world_size, seed=1, shard_of=shard_of)
                for r in range(world_size)]
    per_rank = [list(s) for s in samplers]
    assert len({len(batches) for batches in per_rank}) == 1
    for rank, batches in enumerate(per_rank):
        indices = {i for batch in batches for i in batch}
        assert indices == set(np.flatnonzero(shard_of % world_size == rank).tolist())
        assert all(len(set(groups[batch].tolist())) == 1 for batch in batches)
    with pytest.raises(UserError, match=f"2 shards for {world_size * 2} ranks"):
        DistributedShardSampler(groups, batch_size=3, rank=0, world_size=world_size * 2, seed=1,
                                shard_of=np.minimum(shard_of, 1))


def test_bench_loader_runs_once_tiny(tmp_path):
    """``megdet bench loader`` end to end on 3 real images; figures are not checked, only their presence."""
    import argparse

    from megdet.bench import loader
    from tests.test_pack import real_set

    annotation, images = real_set("coco4")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    loader.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--coco-json", str(annotation), "--images", str(images),
                              "--limit", "3", "--workers", "0", "1", "--passes", "1", "--repeats", "1"])
    assert loader.run(args) == 0
    result = json.loads((tmp_path / "loader.json").read_text())
    assert result["inputs"]["num_images"] == 3
    measured = {(row["source"], row["workers"]) for row in result["rows"]}
    packing = {("pack --format jpeg", 0), ("pack --format raw", 0)}
    assert measured == {(s, w) for s in loader.SOURCES for w in (0, 1)} | packing
    assert all(row["images_per_s"] > 0 for row in result["rows"])
