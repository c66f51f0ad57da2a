"""scripts/gpu_check.sh --cpu: the GPU node's checks at tiny sizes on the CPU, so the script cannot rot
while no GPU is at hand (on a GPU node the same script runs them at full size)."""
import json
import subprocess

import pytest

from tests.multirank import REPO, skip_unless_launcher


@pytest.mark.slow
@pytest.mark.multirank
def test_gpu_check_cpu_mode_passes_every_step(launch_env, tmp_path):
    skip_unless_launcher("horovodrun")  # set-up done (make test runs it first)
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--cpu", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=launch_env({}))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = {row["step"]: row for row in json.loads((tmp_path / "node.json").read_text())["rows"]}
    assert list(rows) == ["doctor", "step", "step-defaults", "amp", "cgbn", "train"]
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["step"]["values"]["image"] == "64x107" and rows["step-defaults"]["values"]["images_per_s"] > 0
    assert rows["cgbn"]["values"]["exact"] and rows["cgbn"]["values"]["max_error"] <= 1e-4
    assert rows["amp"]["values"]["fp32_precision"] == "fp32"
    assert "refused as it should be" in rows["amp"]["values"]["fp16"]
    assert 0 <= rows["train"]["values"]["AP50"] <= 100 and rows["train"]["values"]["images_per_s"] > 0
    assert "| train | ok |" in (tmp_path / "node.md").read_text()
    assert "megdet bench node: 6 of 6 checks passed" in done.stdout
    # the shards, checkpoints and sub-benchmarks' results went to a scratch folder, removed at the end
    assert sorted(path.name for path in tmp_path.iterdir()) == ["node.json", "node.log", "node.md"]


def test_gpu_check_refuses_a_missing_gpu_and_bad_arguments(tmp_path):
    for argv, message in ((["--bogus"], "unknown argument --bogus"), (["--fetch"], "--fetch needs a folder")):
        done = subprocess.run(["bash", "scripts/gpu_check.sh", *argv], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode != 0 and message in done.stderr, done.stderr
    node = subprocess.run([str(REPO / ".venv/bin/python"), "-m", "megdet.cli", "bench", "node", "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    import torch
    if not torch.cuda.is_available():
        assert node.returncode == 2 and "torch sees no GPU: run it on one, or pass --cpu" in node.stderr
        assert json.loads((tmp_path / "node.json").read_text())["rows"][0]["status"] == "FAIL"
