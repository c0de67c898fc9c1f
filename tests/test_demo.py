"""`make demo` end to end at a tiny budget: start state, collection, training, video, evaluation."""
import json
import subprocess
from pathlib import Path

import imageio.v2 as imageio

from checkpoint import load_checkpoint
from dataset import PokemonDataset

REPO = Path(__file__).resolve().parents[1]


def test_make_demo_tiny(tmp_path, cartridge_rom):
    out = tmp_path / "demo"
    done = subprocess.run(
        ["make", "-s", "demo", f"OUT={out}", "DEMO_STEPS=400", "DEMO_EPISODE_LENGTH=100", "DEMO_MINUTES=0.05",
         "DEMO_PRESET=tiny", "DEMO_THREADS=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"demo outputs in {out}" in done.stdout

    assert len(PokemonDataset(out / "data", seq_len=15)) > 0
    ckpt = load_checkpoint(out / "rssm" / "best_world_model.pt", kind="rssm")
    assert ckpt["config"]["preset"] == "tiny" and ckpt["config"]["train_precision"] == "auto"  # DEMO_PRECISION
    frames = imageio.mimread(out / "side_by_side.gif")
    assert len(frames) == 31  # --max-steps 30 plus the start frame
    assert imageio.get_reader(out / "side_by_side.mp4").count_frames() == 31
    results = json.loads((out / "eval" / "results.json").read_text())
    text = json.dumps(results)
    assert "NaN" not in text and "Infinity" not in text
    (model,) = results["results"].values()
    assert [row["k"] for row in model["steps"]] == list(range(1, 51))
    assert (out / "eval" / "drift.png").stat().st_size > 0
