"""scripts/benchmark.py --quick: every figure and ratio is present, finite and carries its configuration.
Speed itself is never asserted (the machine is shared)."""
import json
import math

from conftest import run_script

MEASUREMENTS = ("env_steps", "collect_original", "collect_1_worker", "collect_2_workers", "train_faithful",
                "train_default", "train_faithful_original", "imagine_faithful", "imagine_default", "imagine_original",
                "decode_faithful", "decode_default")
RATIOS = ("collector_vs_original_per_worker", "workers_2_vs_1", "train_faithful_vs_original",
          "imagine_default_vs_original", "imagined_per_emulator_step", "imagined_per_emulator_step_per_core")


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
    done = run_script("benchmark.py", "--quick", "--threads", "1", "--rom", cartridge_rom, "--out", out)
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
    finite_numbers(report, "report")
    for name in MEASUREMENTS + RATIOS:  # the printed table names every figure
        assert name in done.stdout, name
    assert not list(out.parent.glob(".*")), "a temporary file was left beside the output"


def test_bad_flags_exit_2(tmp_path):
    done = run_script("benchmark.py", "--quick", "--workers", "0", "--out", tmp_path / "b.json")
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and errors == ["error: --workers 0 must be at least 1"], done.stderr
    assert "Traceback" not in done.stderr
