"""ImageNet weights for the backbone (``model.backbone_weights``): a file path, or the name of one of
torchvision's ImageNet ResNet checkpoints, found in torch hub's cache; the stages they freeze; and
``megdet weights``, which lists and verifies that cache. Imports no torch until a file is needed.

    resolve("torchvision:resnet50")   # $TORCH_HOME/hub/checkpoints/resnet50-0676ba61.pth, sha256 checked
    resolve("weights/r50.pth")        # a path stays as it is (megdet.model.resnet checks what it holds)
    megdet weights                    # each known name: its file in the cache, present, hash ok

A name resolves to ``torch.hub.get_dir()/checkpoints/<file>`` (``$TORCH_HOME/hub``, default
``~/.cache/torch/hub``), the file torchvision itself downloads for ``ResNet50_Weights.IMAGENET1K_V1``
etc., so a cache filled by torchvision serves megdet too. A cached file is checked on every resolve:
its sha256 must start with the 8 hex digits in its name (torch hub's convention). A missing file is
downloaded there with the same check (``torch.hub.download_url_to_file``); when that fails (offline
compute nodes), the error names the file, the folder and the URL to fetch it from elsewhere.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from hpc.errors import UserError
from hpc.files import file_sha256

# The backbone's stages in the order freeze_at counts them.
STAGES = ("stem", "res2", "res3", "res4", "res5")
# Stages frozen on ImageNet weights: the stem and res2 (detectron2 MODEL.BACKBONE.FREEZE_AT 2).
PRETRAINED_FREEZE_AT = 2
PREFIX = "torchvision:"
URL_ROOT = "https://download.pytorch.org/models"


@dataclass(frozen=True)
class TorchvisionWeights:
    """One torchvision ImageNet checkpoint: ``URL_ROOT/<arch>-<hash_prefix>.pth``."""

    arch: str            # resnet50: fits the backbone of model resnet50_fpn
    enum: str            # torchvision's name for the same file
    hash_prefix: str     # the first 8 hex digits of the file's sha256, part of its name

    @property
    def file_name(self) -> str:
        return f"{self.arch}-{self.hash_prefix}.pth"

    @property
    def url(self) -> str:
        return f"{URL_ROOT}/{self.file_name}"


# name after "torchvision:" -> checkpoint; the hashes are those in torchvision's own file names.
TORCHVISION = {entry.arch: entry for entry in (
    TorchvisionWeights("resnet18", "ResNet18_Weights.IMAGENET1K_V1", "f37072fd"),
    TorchvisionWeights("resnet50", "ResNet50_Weights.IMAGENET1K_V1", "0676ba61"),
    TorchvisionWeights("resnet101", "ResNet101_Weights.IMAGENET1K_V1", "63fe2227"),
)}
NAMES = tuple(PREFIX + arch for arch in TORCHVISION)


def default_freeze_at(pretrained: bool) -> int:
    """Stages frozen unless told otherwise: the stem and res2 on ImageNet weights (detectron2), none
    from scratch (detectron2's scratch configs set FREEZE_AT 0; torchvision trains every layer without
    weights): a frozen random layer would never learn."""
    return PRETRAINED_FREEZE_AT if pretrained else 0


def frozen_stage_names(freeze_at: int) -> Tuple[str, ...]:
    """Names of the stages ``freeze_at`` freezes: 0 none, 1 the stem, 2 stem + res2, ... up to 5."""
    if not 0 <= freeze_at <= len(STAGES):
        raise UserError(f"freeze_at={freeze_at} is out of range; use 0 (train all) to {len(STAGES)}")
    return STAGES[:freeze_at]


def lookup(spec: str) -> Optional[TorchvisionWeights]:
    """The checkpoint ``spec`` names ("torchvision:resnet50"), None for a file path; UserError for an
    unknown name."""
    if not spec.startswith(PREFIX):
        return None
    entry = TORCHVISION.get(spec[len(PREFIX):])
    if entry is None:
        raise UserError(f"backbone weights {spec!r} are not a known name: use one of {', '.join(NAMES)}, "
                        "or the path of a torchvision-layout ResNet checkpoint (.pth)")
    return entry


def cache_dir() -> Path:
    """torch hub's checkpoint folder, as torchvision uses it (``$TORCH_HOME/hub/checkpoints``)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve(spec: str) -> Path:
    """The checkpoint file of ``spec``: a path as it is; a name's file in the cache, downloaded when
    missing; UserError (one line) for a bad hash, or a missing file that cannot be downloaded."""
    entry = lookup(spec)
    if entry is None:
        return Path(spec)
    folder = cache_dir()
    path = folder / entry.file_name
    if path.is_file():
        digest = file_sha256(path)
        if not digest.startswith(entry.hash_prefix):
            raise UserError(f"{path} has sha256 {digest[:8]}..., not {entry.hash_prefix}... as its name says (a "
                            f"broken or other file): delete it, and it is downloaded again when online, or copy "
                            f"{entry.url} there")
        return path
    import torch.hub

    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    try:  # its progress bar starts once the server answers: offline, the error below is all that is said
        torch.hub.download_url_to_file(entry.url, str(path), hash_prefix=entry.hash_prefix, progress=True)
    except (OSError, RuntimeError) as error:  # urllib's URLError is an OSError
        for parent in created:  # innermost first; leave nothing behind
            if parent.exists() and not any(parent.iterdir()):
                parent.rmdir()
        reason = " ".join(str(error).split())
        if isinstance(error, RuntimeError):  # torch's hash check of the download
            raise UserError(f"the download of {entry.url} has the wrong sha256 ({reason}): try again, or "
                            f"fetch the file elsewhere and copy it to {path}") from None
        raise UserError(f"{spec} is not in torch hub's cache ({path} is missing) and cannot be downloaded "
                        f"({reason}): fetch {entry.url} on a machine that is online and copy it into {folder} "
                        f"(the cache folder follows $TORCH_HOME)") from None
    return path


def cached() -> List[Dict[str, str]]:
    """One row per known name: its file in the cache and whether it is there with the right hash."""
    folder = cache_dir()
    rows = []
    for name, entry in zip(NAMES, TORCHVISION.values()):
        path = folder / entry.file_name
        if not path.is_file():
            status = "missing"
        else:
            digest = file_sha256(path)
            status = "ok" if digest.startswith(entry.hash_prefix) else f"BAD HASH {digest[:8]}"
        rows.append({"name": name, "torchvision": entry.enum, "file": str(path), "status": status, "url": entry.url})
    return rows


def add_arguments(parser) -> None:
    parser.description = ("List torchvision's ImageNet ResNet weights that model.backbone_weights can name, where "
                          "each lies in torch hub's cache ($TORCH_HOME/hub/checkpoints), and check each present "
                          "file's sha256 against its name.")


def run(args) -> int:
    rows = cached()
    print(f"cache folder {cache_dir()} (TORCH_HOME={os.environ.get('TORCH_HOME', 'unset')})")
    for row in rows:
        where = row["file"] if row["status"] != "missing" else f"fetch {row['url']}"
        print(f"{row['name']:<22} {row['torchvision']:<33} {row['status']:<16} {where}")
    bad = [row["file"] for row in rows if row["status"].startswith("BAD")]
    if bad:
        raise UserError(f"{', '.join(bad)} {'do' if len(bad) > 1 else 'does'} not match the sha256 in the name "
                        "(broken or other files): delete them, and they are downloaded again when online")
    return 0
