"""scripts/benchmark.py --quick: every figure and ratio is present, finite and carries its configuration.
Speed itself is never asserted (the machine is shared)."""
import json
import math
import subprocess
import sys

import pytest

from conftest import load_script, run_script

MEASUREMENTS = ("env_steps", "collect_original", "collect_1_worker", "collect_2_workers", "train_faithful",
                "train_default", "train_faithful_original", "imagine_faithful", "imagine_default", "imagine_original",
                "decode_faithful", "decode_default", "env_steps_in_turns", "imagine_default_in_turns",
                "imagine_default_matmuls_in_turns", "imagine_default_torch_loop", "imagine_default_torch_loop_in_turns",
                "train_default_torch_loss", "train_default_torch_loss_beside")
RATIOS = ("collector_vs_original_per_worker", "workers_2_vs_1", "train_faithful_vs_original",
          "imagine_default_vs_original", "imagined_per_emulator_step", "imagined_per_emulator_step_per_core",
          "imagined_per_emulator_step_apart", "imagined_per_emulator_step_matmul_ceiling",
          "imagine_default_fused_vs_torch_loop", "imagined_per_emulator_step_torch_loop",
          "train_default_torch_loss_vs_plain")


def finite_numbers(value, where):
    """Every number inside `value` (nested dicts/lists) is finite."""
    if isinstance(value, dict):
        for key, item in value.items():
            finite_numbers(item, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            finite_numbers(item, f"{where}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), where


def test_quick_benchmark_reports_every_field(tmp_path, cartridge_rom):
    out = tmp_path / "sub" / "benchmarks.json"
    done = run_script("benchmark.py", "--quick", "--threads", "1", "--rom", cartridge_rom, "--out", out,
                      "--against", "HEAD")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(MEASUREMENTS) <= report["results"].keys()
    for name, result in report["results"].items():
        assert result["value"] > 0 and result["unit"], name
        assert result["peak_rss_mb"] > 0 and result["seconds"] > 0 and result["config"], name
    for name in RATIOS:
        assert report["ratios"][name]["value"] > 0, name
    assert report["ratios"]["collector_vs_original_per_worker"]["target"] == 3.0
    assert report["ratios"]["train_faithful_vs_original"]["target"] == 1.25
    assert report["config"]["quick"] and report["config"]["torch"]
    assert report["results"]["train_faithful"]["config"]["allocator"] == "keep_freed_memory"
    assert report["results"]["train_faithful_original"]["config"]["allocator"] == "default"
    assert report["ratios"]["imagined_per_emulator_step"]["target"] == 200.0
    assert report["results"]["imagine_default"]["config"]["gru_blocks"] == 8
    for name in ("imagine_default", "imagine_default_in_turns"):
        assert report["results"][name]["minor_page_faults_per_rollout"] >= 0, name
    assert report["results"]["imagine_default"]["config"]["allocator"] == "keep_freed_memory"
    turns = report["results"]["imagine_default_in_turns"]
    assert turns["config"]["preset"] == "default" and turns["config"]["interleaved_with"]
    assert report["ratios"]["imagined_per_emulator_step"]["value"] == pytest.approx(
        turns["value"] / report["results"]["env_steps_in_turns"]["value"])
    for name in ("train_faithful", "train_faithful_original", "train_default"):
        assert report["results"][name]["minor_page_faults_per_step"] >= 0, name
    ceiling = report["results"]["imagine_default_matmuls_in_turns"]  # the same rollout's matrix products alone
    assert ceiling["config"]["multiply_adds_per_step"] > 0 and ceiling["config"]["batch"] == turns["config"]["batch"]
    assert ceiling["config"]["gmac_per_s"] == pytest.approx(ceiling["value"] * ceiling["config"]["multiply_adds_per_step"] / 1e9)
    assert report["ratios"]["imagined_per_emulator_step_matmul_ceiling"]["value"] == pytest.approx(
        ceiling["value"] / report["results"]["env_steps_in_turns"]["value"])
    # the default preset's greedy rollouts run fused.cpp's loop, in turns with torch's loop
    results = report["results"]
    assert results["imagine_default"]["config"]["fused"] and not results["imagine_faithful"]["config"]["fused"]
    assert not results["imagine_default_torch_loop"]["config"]["fused"] and turns["config"]["fused"]
    assert "imagination.imagine in torch's loop" in turns["config"]["interleaved_with"]
    assert "torch_loop" in results["imagine_default"]["config"]["interleaved_with"]
    assert report["ratios"]["imagine_default_fused_vs_torch_loop"]["value"] == pytest.approx(
        results["imagine_default"]["value"] / results["imagine_default_torch_loop"]["value"])
    assert report["ratios"]["imagined_per_emulator_step_torch_loop"]["value"] == pytest.approx(
        results["imagine_default_torch_loop_in_turns"]["value"] / results["env_steps_in_turns"]["value"])
    # its training step with fused.cpp's tile cross-entropy, in turns with torch's
    assert results["train_default"]["config"]["fused_loss"] and results["train_default_torch_loss_beside"]["config"]["fused_loss"]
    assert not results["train_default_torch_loss"]["config"]["fused_loss"]
    assert not results["train_faithful"]["config"]["fused_loss"]  # pixels: no tile loss
    assert report["ratios"]["train_default_torch_loss_vs_plain"]["value"] == pytest.approx(
        results["train_default_torch_loss"]["value"] / results["train_default_torch_loss_beside"]["value"])
    before = report["results"]["imagine_default_at_HEAD"]  # models.py as committed, in turns with the tree's
    assert before["config"]["interleaved_with"] == ["imagination.imagine (inference mode)"]
    assert "at_HEAD" in report["results"]["imagine_default"]["config"]["interleaved_with"]
    assert report["ratios"]["imagine_default_vs_HEAD"]["value"] == pytest.approx(
        report["results"]["imagine_default"]["value"] / before["value"])
    trained = report["results"]["train_default_at_HEAD"]  # its training step too, step by step in turns
    beside = report["results"]["train_default_at_HEAD_beside"]
    assert trained["config"]["interleaved_with"] == ["ours"] and "as of HEAD" in trained["config"]["way"]
    assert beside["config"]["interleaved_with"] == ["train_rssm.py's step with models.py as of HEAD"]
    assert report["ratios"]["train_default_vs_HEAD"]["value"] == pytest.approx(beside["value"] / trained["value"])
    assert not any(name.startswith("train_default_at_HEAD") for name in report["ratios"] if name.endswith("_vs_plain"))
    assert "against_models" not in report["config"]
    finite_numbers(report, "report")
    for name in MEASUREMENTS + RATIOS:  # the printed table names every figure
        assert name in done.stdout, name
    assert not list(out.parent.glob(".*")), "a temporary file was left beside the output"


def test_imagination_measures_the_model_it_is_given_and_its_variants_in_turns():
    """--hot-paths' variants of the default preset (a dense GRU, a linear prior): the same measurement with
    one field changed, timed in turns with the preset's own rollouts."""
    benchmark = load_script("benchmark")
    size = dict(preset="default", batch=4, horizon=2, repeats=1, threads=1, image_size=(144, 160))
    dense = benchmark.measure_imagination(overrides={"gru_blocks": 1}, **size)
    assert dense["config"]["gru_blocks"] == 1 and dense["config"]["preset"] == "default" and dense["value"] > 0
    every = benchmark.measure_imagination(variants=benchmark.IMAGINATION_VARIANTS, **size)
    assert every["config"]["gru_blocks"] == 8
    assert every["config"]["interleaved_with"] == ["torch_loop", "dense_gru", "linear_prior"]
    every.update(peak_rss_mb=1.0, seconds=1.0)  # what isolated() adds
    for name, fields in benchmark.IMAGINATION_VARIANTS.items():
        variant = benchmark.paired(every, name, name, **fields)
        assert variant["value"] > 0 and variant["config"].items() >= fields.items() and name not in every


@pytest.mark.parametrize("preset, overrides", [("default", {}), ("default", {"gru_blocks": 1}), ("faithful", {}),
                                               ("tiny", {})])
def test_matmul_ceiling_runs_the_matrix_products_of_a_rollout_step(preset, overrides):
    """rollout_matmuls: per latent step as many multiply-adds as RSSM.greedy_rollout's own matrix products (torch's
    FLOP counter: a rollout one step longer costs 2 x batch x macs FLOPs more), for each kind of GRU. The torch
    loop's (the counter sees ATen's products, not fused.cpp's calls into MKL; that loop multiplies the same
    matrices)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fused

    benchmark = load_script("benchmark")
    wm = benchmark._world_model(torch, preset, (144, 160), overrides=overrides).eval()
    batch = 4
    loop, macs = benchmark.rollout_matmuls(torch, wm, batch, horizon=3)

    def flops(function):
        with torch.inference_mode(), fused.off(), FlopCounterMode(display=False) as counter:
            function()
        return counter.get_total_flops()

    h, z = wm.rssm.initial(batch)
    per_step = [flops(lambda: wm.rssm.greedy_rollout(h, z, torch.zeros(batch, horizon, dtype=torch.long)))
                for horizon in (2, 3)]
    assert macs > 0 and per_step[1] - per_step[0] == 2 * batch * macs
    assert flops(loop) == 3 * 2 * batch * macs


def test_against_another_models_file_times_it_in_turns_or_says_it_differs(tmp_path, collected_data):
    """--against's measurements: another models.py with this tree's weights in turns (imagination, and the
    training step); one whose default preset has other weights is a UserError naming the file."""
    from errors import UserError

    benchmark = load_script("benchmark")
    size = dict(preset="default", batch=4, horizon=2, repeats=1, threads=1, image_size=(144, 160))
    same = tmp_path / "models_same.py"
    same.write_text((benchmark.REPO / "models.py").read_text())
    both = benchmark.measure_imagination(against=("at_same", str(same)), **size)
    assert both["at_same"] > 0 and both["config"]["interleaved_with"] == ["torch_loop", "at_same"]
    dense = tmp_path / "models_dense.py"
    text = same.read_text()
    assert "gru_blocks=8, kl_rep=0.5" in text
    dense.write_text(text.replace("gru_blocks=8, kl_rep=0.5", "gru_blocks=1, kl_rep=0.5"))
    with pytest.raises(UserError, match="models_dense.py: its default preset has other weights"):
        benchmark.measure_imagination(against=("at_dense", str(dense)), **size)
    train = dict(data_dir=collected_data("144x160"), preset="default", batch_size=2, seq_len=4, steps=1, threads=1)
    trained = benchmark.measure_training(ways=("at_same", "ours"), against_path=str(same), **train)
    assert trained["value"] > 0 and trained["ours"] > 0 and trained["config"]["interleaved_with"] == ["ours"]
    with pytest.raises(UserError, match="models_dense.py: its default preset has other weights"):
        benchmark.measure_training(ways=("at_dense", "ours"), against_path=str(dense), **train)


def test_training_step_as_before_session_10_is_timed_in_turns(collected_data):
    """--hot-paths' train_default_every_step: tokens, frame metrics and the multi-tensor Adam every step,
    in turns with train_rssm.py's step (tile ids made once, no frame metrics, fused Adam)."""
    benchmark = load_script("benchmark")
    both = benchmark.measure_training(collected_data("144x160"), preset="default", batch_size=2, seq_len=4, steps=1,
                                      threads=1, ways=("every_step", "ours"))
    assert both["value"] > 0 and both["ours"] > 0 and both["config"]["way"] == "every_step"
    assert both["config"]["interleaved_with"] == ["ours"]
    assert both["config"]["precision"] == "float32"  # the default preset's field
    low = benchmark.measure_training(collected_data("144x160"), preset="default", batch_size=2, seq_len=4, steps=1,
                                     threads=1, precision="bfloat16")  # --train-precision
    assert low["value"] > 0 and low["config"]["precision"] == "bfloat16"


def test_bad_flags_exit_2(tmp_path):
    done = run_script("benchmark.py", "--quick", "--workers", "0", "--out", tmp_path / "b.json")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and errors == ["error: --workers 0 must be at least 1"], done.stderr
    assert "Traceback" not in done.stderr
    done = run_script("benchmark.py", "--quick", "--train-batch-size", "0", "--out", tmp_path / "b.json")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and errors == ["error: --train-batch-size 0 must be at least 1"], done.stderr
    assert "Traceback" not in done.stderr
    done = run_script("benchmark.py", "--quick", "--against", "no-such-revision", "--out", tmp_path / "b.json")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1 and "--against no-such-revision" in errors[0], done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "b.json").exists()


FAULTS = """
import resource, sys
import torch
sys.path.insert(0, {repo!r})
import checkpoint
if sys.argv[1] == "keep":
    assert checkpoint.keep_freed_memory()
def step():  # a training step in small: large activations made, written, freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n).fill_(1.0) for n in (1 << 24, 3 << 22, 1 << 23)]  # 64, 48 and 32 MB
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(sum([step() for _ in range(10)][-3:]))
"""


def test_keep_freed_memory_reuses_large_blocks():
    """Default glibc maps every block over 32 MB afresh and unmaps it when freed, so each "step" page-faults
    its 144 MB in again (~37,000 faults); with checkpoint.keep_freed_memory, once the heap has grown
    (a few steps: posix_memalign's slack makes the first re-allocations miss), steps reuse it."""
    from conftest import REPO

    def faults_of_the_last_three_steps(mode):
        done = subprocess.run([sys.executable, "-c", FAULTS.format(repo=str(REPO)), mode], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        return int(done.stdout)

    assert faults_of_the_last_three_steps("default") > 90_000
    assert faults_of_the_last_three_steps("keep") < 3_000
