"""The six gates of a pocket build (flowalign/pocket/gates.py, `flowalign pocket gates`): each passes and
fails on the side of its threshold it should, a missing measurement is reported as not measured, and the
shipped calibration.json's gates are what the command computes from the measurements recorded there."""

import json
import shutil
import subprocess
import sys

import pytest

from flowalign.pocket.assets import WEIGHTS_DIR
from flowalign.pocket.gates import gate_report, split_leaks

CATS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def _strict(overall, **low):
    return {**{c: max(overall, 0.85) for c in CATS}, **low, "overall": overall}


def _calibration(base=0.55, sweep=None):
    sweep = sweep or {"steps20_cfg3.0": _strict(base), "steps20_cfg1.5": _strict(base - 0.05)}
    return {"default_sampler": {"num_steps": 20, "guidance_scale": 3.0, "seed": 0, "strict": _strict(base)},
            "sweep_strict": sweep}


def _pass_at_k(acc, pass_k, majority, k=12):
    return {"K": k, "strict": {"overall": {"acc": acc, "pass@K": pass_k, "majority": majority}}}


def _bound(start, best, threads=2, late=None):
    curve = [{"minutes": 0.0, "strict": start}, {"minutes": 5.0, "strict": best}]
    if late is not None:
        curve.append({"minutes": 15.0, "strict": late})
    return {"threads": threads, "curve": curve}


def test_every_gate_holds_on_a_world_that_meets_the_targets():
    g = gate_report(_calibration(0.55), oracle=_strict(0.92), pass_at_k=_pass_at_k(0.55, 0.97, 0.80),
                    bound=_bound(0.55, 0.86), leaks=[])
    assert [x["pass"] for x in g.values()] == [True] * 6
    assert g["3_honest_sampler"]["gap"] == pytest.approx(0.37)


@pytest.mark.parametrize("change, gate", [
    ({"oracle": _strict(0.89)}, "1_capacity"),                         # overall under 0.90
    ({"oracle": _strict(0.93, counting=0.79)}, "1_capacity"),          # one category under 0.80
    ({"base": 0.61}, "2_misalignment"),
    ({"base": 0.34}, "2_misalignment"),
    ({"sweep": {"steps20_cfg3.0": _strict(0.55), "steps20_cfg2.0": _strict(0.56)}}, "3_honest_sampler"),
    ({"oracle": _strict(0.92), "base": 0.55, "sweep": {"steps20_cfg3.0": _strict(0.55),
                                                    "steps40_cfg3.0": _strict(0.73)}}, "3_honest_sampler"),
    ({"pass_at_k": _pass_at_k(0.55, 0.94, 0.80)}, "4_skill_there"),
    ({"pass_at_k": _pass_at_k(0.55, 0.97, 0.80, k=8)}, "4_skill_there"),
    ({"bound": _bound(0.55, 0.84)}, "5_reachable"),
    ({"bound": _bound(0.55, 0.70, late=0.90)}, "5_reachable"),          # reached only after 10 minutes
    ({"bound": _bound(0.55, 0.86, threads=4)}, "5_reachable"),
    ({"leaks": ["a red circle"]}, "6_split_honest"),
])
def test_each_gate_fails_just_past_its_threshold(change, gate):
    args = {"oracle": _strict(0.92), "pass_at_k": _pass_at_k(0.55, 0.97, 0.80), "bound": _bound(0.55, 0.86), "leaks": []}
    base, sweep = change.pop("base", 0.55), change.pop("sweep", None)
    args.update(change)
    g = gate_report(_calibration(base, sweep), **args)
    assert g[gate]["pass"] is False
    assert all(v["pass"] for k, v in g.items() if k != gate), {k: v["pass"] for k, v in g.items()}


def test_majority_is_reported_beside_gate_4_not_gated():
    args = {"oracle": _strict(0.92), "bound": _bound(0.55, 0.86), "leaks": []}
    low = gate_report(_calibration(0.55), pass_at_k=_pass_at_k(0.55, 0.97, 0.74), **args)["4_skill_there"]
    high = gate_report(_calibration(0.55), pass_at_k=_pass_at_k(0.55, 0.97, 0.75), **args)["4_skill_there"]
    assert (low["pass"], low["majority_holds"]) == (True, False)
    assert (high["pass"], high["majority_holds"]) == (True, True)


def test_a_sweep_setting_one_prompt_better_than_the_default_is_a_tie():
    sweep = {"steps20_cfg3.0": _strict(0.55), "steps20_cfg2.0": _strict(0.55 + 1 / 384)}
    g = gate_report(_calibration(0.55, sweep), oracle=_strict(0.92))
    assert g["3_honest_sampler"]["default_is_best"] and g["3_honest_sampler"]["pass"]


def test_missing_measurements_are_not_measured_with_their_command():
    g = gate_report({"default_sampler": {"num_steps": 20, "guidance_scale": 3.0, "strict": _strict(0.5)}})
    assert g["2_misalignment"]["pass"] is True
    for name in ("1_capacity", "3_honest_sampler", "4_skill_there", "5_reachable"):
        assert g[name]["pass"] is None and "command" in g[name], name
    assert g["6_split_honest"]["pass"] is None


def test_split_leaks_finds_a_prompt_the_training_set_covers():
    assert split_leaks(["a red circle"], ["a circle"]) == []  # a bare shape holds nothing back
    # "a green circle" holds no held-out combination at all; a held-out prompt seen in training leaks too
    from flowalign.pocket.prompts import HELDOUT, all_prompts, combinations
    held = next(s for s in all_prompts("colors") if combinations(s) & HELDOUT)
    from flowalign.pocket.grammar import spec_to_prompt
    text = spec_to_prompt(held)
    assert split_leaks([], [text]) == []
    assert split_leaks([text], [text]) == [text]
    plain = next(spec_to_prompt(s) for s in all_prompts("colors") if not combinations(s) & HELDOUT)
    assert split_leaks([], [plain]) == [plain]


def test_shipped_gates_are_what_the_command_computes_from_the_recorded_measurements(tmp_path):
    shipped = json.loads((WEIGHTS_DIR / "calibration.json").read_text())
    shutil.copy(WEIGHTS_DIR / "calibration.json", tmp_path / "calibration.json")
    proc = subprocess.run([sys.executable, "-m", "flowalign", "pocket", "gates", "--models", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "calibration.json").read_text())["gates"] == shipped["gates"]
    assert "gate 6_split_honest    holds" in proc.stdout


@pytest.mark.parametrize("flag, content, message", [
    ("--bound", None, "does not exist"),
    ("--bound", "not json", "not readable JSON"),
    ("--pass-at-k", '{"strict": {}}', "has no 'K'"),
])
def test_gates_refuses_bad_measurement_files(tmp_path, flag, content, message):
    shutil.copy(WEIGHTS_DIR / "calibration.json", tmp_path / "calibration.json")
    f = tmp_path / "m.json"
    if content is not None:
        f.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "flowalign", "pocket", "gates", "--models", str(tmp_path), flag, str(f)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_gates_refuses_a_folder_that_is_not_a_build(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flowalign", "pocket", "gates", "--models", str(tmp_path)],
                          check=False, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1
    assert "calibration.json' does not exist" in proc.stderr and "flowalign pocket build` output folder" in proc.stderr
