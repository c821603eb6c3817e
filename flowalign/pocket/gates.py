"""The pocket world's six gates, computed from their measurements and written into ``calibration.json``.

A rebuilt pocket world is only useful if alignment can fix it; the gates say whether it can (README,
"Building the pocket models"):

1. capacity: the oracle (clean captions) ≥ 0.90 held-out strict overall and ≥ 0.80 in every category at
   the base's default sampler;
2. misalignment: the base in 0.35–0.60 at its default sampler;
3. an honest default sampler: the default is the base's best sweep setting (ties within one prompt),
   and that best is ≥ 0.20 below the oracle;
4. the skill is there: pass@K ≥ 0.95 over K = 12 seeds (majority-over-seeds ≥ mean + 0.20 is reported
   beside it, not gated: a prompt drawn right with probability p is a 12-seed majority with probability
   P(Binomial(12, p) ≥ 7), at most p + 0.20, so for a base whose mean is ≤ 0.60 the expected margin is at
   most +0.16 — ``benchmarks/pocket_pass_at_k.py``; a base whose mode is right that often is aligned already);
5. reachable: the supervised bound (LoRA r32, clean renders of the RL prompts) ≥ +0.30 within 10
   minutes on 2 cores;
6. an honest split: every held-out prompt holds a held-out combination the RL prompts never show.

``gate_report`` is pure (dicts in, dict out); ``flowalign pocket gates`` gathers the inputs (the base's
``calibration.json`` from ``flowalign pocket build --sweep``, an oracle model it scores, the JSON files of
``benchmarks/pocket_pass_at_k.py`` and ``benchmarks/pocket_supervised_bound.py``) and writes ``gates``
back into that ``calibration.json``. A gate whose measurement is missing has ``pass: null`` and the
command that measures it.
"""

from __future__ import annotations

from .grammar import parse_prompt
from .prompts import HELDOUT, combinations

__all__ = ["COMMANDS", "TARGETS", "default_strict", "gate_report", "oracle_at", "split_leaks"]

TARGETS = {"oracle_overall": 0.90, "oracle_category": 0.80, "base_low": 0.35, "base_high": 0.60, "gap": 0.20,
           "pass_at_k": 0.95, "k": 12, "majority_margin": 0.20, "bound_gain": 0.30, "bound_minutes": 10.0,
           "bound_threads": 2}
COMMANDS = {
    "1_capacity": "flowalign pocket build --captions clean --out oracle && flowalign pocket gates --models DIR --oracle oracle/t2i",
    "3_honest_sampler": "flowalign pocket build --sweep (the sweep is part of the base's calibration.json)",
    "4_skill_there": "python benchmarks/pocket_pass_at_k.py --seeds 12, then flowalign pocket gates --pass-at-k FILE",
    "5_reachable": "python benchmarks/pocket_supervised_bound.py --minutes 10 --threads 2, then flowalign pocket gates --bound FILE",
}


def default_strict(calibration: dict) -> dict:
    """Strict accuracy per category at the default sampler, from a build's calibration (``gold.strict``)
    or an assembled one (``strict``)."""
    ds = calibration["default_sampler"]
    return ds["strict"] if "strict" in ds else ds["gold"]["strict"]


def oracle_at(calibration: dict) -> dict | None:
    """The oracle's strict accuracy per category at the base's default sampler, if recorded: ``oracle.strict_default``,
    or (older files) ``oracle.strict_by_cfg_20_steps[<CFG>]`` when the default has 20 steps."""
    oracle = calibration.get("oracle") or {}
    if "strict_default" in oracle:
        return oracle["strict_default"]
    ds = calibration["default_sampler"]
    by_cfg = oracle.get("strict_by_cfg_20_steps") or {}
    if ds.get("num_steps") == 20:
        for key, strict in by_cfg.items():
            if float(key) == float(ds["guidance_scale"]):
                return strict
    return None


def split_leaks(train_prompts: list[str], test_prompts: list[str]) -> list[str]:
    """Held-out prompts that break gate 6: a colored, counted or two-object prompt with no held-out
    combination, or whose every combination the training prompts already show."""
    seen = set().union(*(combinations(parse_prompt(p)) for p in train_prompts))
    leaks = []
    for text in test_prompts:
        combos = combinations(parse_prompt(text))
        if combos and (not combos & HELDOUT or not combos - seen):  # a bare shape has nothing to hold out
            leaks.append(text)
    return leaks


def _r(x: float) -> float:
    return round(float(x), 3)


def gate_report(calibration: dict, *, oracle: dict | None = None, pass_at_k: dict | None = None,
                bound: dict | None = None, leaks: list[str] | None = None, prompts: int = 384) -> dict:
    """The six gates from their measurements.

    ``calibration``: the base's (``default_sampler`` with ``num_steps``, ``guidance_scale`` and its strict
    accuracy per category; ``sweep_strict``: sweep key → strict per category). ``oracle``: the oracle's
    strict per category at that default. ``pass_at_k``: ``benchmarks/pocket_pass_at_k.py``'s JSON (``K``,
    ``strict.overall`` with ``acc``, ``pass@K``, ``majority``). ``bound``: ``pocket_supervised_bound.py``'s
    JSON (``threads``, ``curve`` of ``{minutes, strict}``). ``leaks``: ``split_leaks``'s answer.
    ``prompts``: held-out prompts behind the accuracies (a sweep setting within one prompt of the best ties).
    """
    from .build import sweep_key

    t = TARGETS
    base = default_strict(calibration)
    ds = calibration["default_sampler"]
    gates: dict[str, dict] = {}

    g = {"target": f"oracle >= {t['oracle_overall']:.2f} overall and >= {t['oracle_category']:.2f} every category "
                   "at the default sampler"}
    if oracle is None:
        g.update({"pass": None, "command": COMMANDS["1_capacity"]})
    else:
        low = {k: _r(v) for k, v in oracle.items() if k not in ("overall", "overall_images") and v < t["oracle_category"]}
        g.update({"oracle_overall": _r(oracle["overall"]), "below_category_target": low,
                  "pass": bool(oracle["overall"] >= t["oracle_overall"] and not low)})
    gates["1_capacity"] = g

    gates["2_misalignment"] = {
        "target": f"base in {t['base_low']:.2f}-{t['base_high']:.2f} at the default sampler",
        "base": _r(base["overall"]), "pass": bool(t["base_low"] <= base["overall"] <= t["base_high"])}

    g = {"target": f"default = the base's best sweep setting (ties within one of {prompts} prompts); "
                   f"base best >= {t['gap']:.2f} below the oracle"}
    sweep = calibration.get("sweep_strict")
    if not sweep:
        g.update({"pass": None, "command": COMMANDS["3_honest_sampler"]})
    else:
        default_key = sweep_key(ds["num_steps"], ds["guidance_scale"])
        best_key = max(sweep, key=lambda k: sweep[k]["overall"])
        best = sweep[best_key]["overall"]
        default_is_best = base["overall"] >= best - 1.0 / prompts - 1e-9
        g.update({"default": default_key, "base_best": _r(best), "best_at": best_key,
                  "default_is_best": bool(default_is_best)})
        if oracle is None:
            g.update({"pass": None if default_is_best else False, "command": COMMANDS["1_capacity"]})
        else:
            gap = oracle["overall"] - best
            g.update({"oracle_at_default": _r(oracle["overall"]), "gap": _r(gap),
                      "pass": bool(default_is_best and gap >= t["gap"])})
    gates["3_honest_sampler"] = g

    g = {"target": f"pass@{t['k']} >= {t['pass_at_k']:.2f} (majority >= mean + {t['majority_margin']:.2f} is "
                   "reported beside it: at K = 12 it cannot hold in expectation for a base whose mean is <= 0.60)"}
    if pass_at_k is None:
        g.update({"pass": None, "command": COMMANDS["4_skill_there"]})
    else:
        o = pass_at_k["strict"]["overall"]
        g.update({"K": pass_at_k.get("K"), "pass@K": _r(o["pass@K"]), "mean": _r(o["acc"]),
                  "majority": _r(o["majority"]),
                  "majority_holds": bool(o["majority"] >= o["acc"] + t["majority_margin"]),
                  "pass": bool(pass_at_k.get("K") == t["k"] and o["pass@K"] >= t["pass_at_k"])})
        if "plurality" in o:
            g["plurality"] = _r(o["plurality"])
    gates["4_skill_there"] = g

    g = {"target": f"supervised bound (LoRA r32, clean renders of the RL training prompts) >= +{t['bound_gain']:.2f} "
                   f"within {t['bound_minutes']:.0f} minutes on {t['bound_threads']} cores"}
    if bound is None:
        g.update({"pass": None, "command": COMMANDS["5_reachable"]})
    else:
        curve = bound["curve"]
        start = curve[0]["strict"]
        within = [p for p in curve if p["minutes"] <= t["bound_minutes"] + 1e-6]
        gain = max(p["strict"] for p in within) - start
        threads_ok = bound.get("threads") is not None and bound["threads"] <= t["bound_threads"]
        g.update({"start": _r(start), "gain_max": _r(gain), "threads": bound.get("threads"),
                  "curve": [{"minutes": p["minutes"], "strict": _r(p["strict"])} for p in curve],
                  "pass": bool(threads_ok and gain >= t["bound_gain"])})
    gates["5_reachable"] = g

    g = {"target": "every held-out prompt holds a held-out combination the RL training prompts never show",
         "test": "tests/test_pocket_prompts.py"}
    if leaks is None:
        g["pass"] = None
    else:
        g.update({"leaks": leaks[:10], "pass": not leaks})
    gates["6_split_honest"] = g
    return gates
