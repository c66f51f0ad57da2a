"""The process that scores one rank's share of an evaluation beside training (``train.async_eval``,
``megdet.engine.background_scoring`` starts it): pycocotools' matching and accumulation for the
categories dealt to this rank (``megdet.engine.coco_split.score_categories``), written for the
training process to combine. It imports neither torch nor the model, so it starts in about a second.

    python -m megdet.engine.scoring_worker SHARE_FILE PIECES_FILE

SHARE_FILE (pickle): {"ground_truth": path of the COCO instances JSON, "results": this rank's checked
COCO results (boxes; masks as RLE when scoring segm), "categories": the rank's category ids,
"iou_types": ["bbox"] or ["bbox", "segm"]}. PIECES_FILE (pickle, written whole or not at all):
{iou type: CategoryScores}. A failure prints one line to stderr and exits 1.
"""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import sys
from pathlib import Path
from typing import Dict

from pycocotools.coco import COCO

from hpc.files import write_atomic
from megdet.engine.coco_split import CategoryScores, score_categories


def score_share(share_path: Path, pieces_path: Path) -> None:
    """Score the share in ``share_path`` and write its pieces to ``pieces_path``."""
    share = pickle.loads(share_path.read_bytes())
    coco_gt = COCO()
    coco_gt.dataset = json.loads(Path(share["ground_truth"]).read_text())
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt.createIndex()
    pieces: Dict[str, CategoryScores] = {
        iou_type: score_categories(coco_gt, share["results"], share["categories"], iou_type)
        for iou_type in share["iou_types"]}
    write_atomic(pieces_path, pickle.dumps(pieces))


def main(argv=None) -> int:
    share_path, pieces_path = (Path(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        score_share(share_path, pieces_path)
    except (OSError, MemoryError, pickle.UnpicklingError, json.JSONDecodeError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
