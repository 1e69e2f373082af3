"""scripts/gpu_check.py --tiny on the CPU: the JSON it prints has every part, with positive numbers (never speed)."""
import json
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import gpu_check  # noqa: E402


def test_gpu_check_tiny_prints_the_whole_record_on_cpu(tmp_path, capsys):
    record = gpu_check.main(["--tiny", "--device", "cpu", "--out", str(tmp_path / "check.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((tmp_path / "check.json").read_text())
    assert printed["results"].keys() == record["results"].keys() and printed["settings"]["model"] == "resnet18"
    s = printed["settings"]
    assert (s["image_size"], s["steps"], s["compile"], s["precision"], s["channels_last"]) == (32, 3, False, "fp32",
                                                                                               True)
    results = printed["results"]
    runs = {k: v for k, v in results.items() if k != "compile"}
    assert {"trainrun_eager", "hand_eager", "trainrun_guard_off"} <= set(runs)
    assert results["compile"]["skipped"].startswith("--tiny runs without torch.compile")
    for name, r in runs.items():
        assert r["images_per_s"] > 0 and r["ms_per_step"] > 0 and len(r["images_per_s_windows"]) == s["reps"], name
        assert r["peak_memory"]["bytes"] > 0 and "RSS" in r["peak_memory"]["kind"], name
        assert r["loop"] == ("hand" if name.startswith("hand") else "trainrun") and r["compile"] is False
    assert runs["trainrun_guard_off"]["overrides"] == ["doctor.nan_guard=off"]
    ratios = printed["ratios"]
    assert ratios["trainrun_over_hand_eager"] > 0 and ratios["trainrun_over_hand_compile"] is None
    assert isinstance(ratios["guard_cost_share"], float)  # a share of the step; its sign is noise on a CPU
    assert printed["two_process"]["skipped"].startswith("--device cpu")
