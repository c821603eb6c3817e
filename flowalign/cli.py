"""The ``flowalign`` command line.

    flowalign config show [CONFIG.yaml] [key=value ...]   print the resolved, validated config
    flowalign config keys                                 every config key with its default and help
    flowalign check-sampler [CONFIG.yaml] [key=value ...] run the configured sampler on a Gaussian
                                                          mixture with its exact velocity and compare
                                                          the samples with the true distribution

Subcommands of other parts of the library register themselves through ``register(subparsers)``.
"""

from __future__ import annotations

import argparse
import sys

from .config import describe, load_config, to_yaml
from .errors import check_output_dir, run_command
from .io import atomic_write_json


def _split_config_args(args: list[str]) -> tuple[str | None, list[str]]:
    """``[CONFIG.yaml] [key=value ...]`` → (path or None, overrides)."""
    if args and "=" not in args[0]:
        return args[0], args[1:]
    return None, list(args)


def _cmd_config_show(ns) -> int:
    path, overrides = _split_config_args(ns.args)
    cfg = load_config(path, overrides)
    sys.stdout.write(to_yaml(cfg))
    return 0


def _cmd_config_keys(ns) -> int:
    rows = describe()  # the `flowalign train` config
    width = max(len(k) for k, _, _ in rows)
    for key, default, help_ in rows:
        print(f"{key:<{width}}  {help_}  [default: {default}]")
    return 0


def _cmd_check_sampler(ns) -> int:
    import torch

    from .sampling import SDEPolicy, sd3_sigmas
    from .sampling.analytic import GaussianMixture

    path, overrides = _split_config_args(ns.args)
    cfg = load_config(path, overrides)
    if ns.out:
        from pathlib import Path

        check_output_dir(Path(ns.out).parent, "--out")
    s = cfg.sampling
    gen = torch.Generator().manual_seed(cfg.run.seed)
    gm = GaussianMixture.default()
    sde = SDEPolicy.from_config(s, sd3_sigmas(s.num_steps, shift=s.shift if s.shift is not None else 1.0))
    plan = sde.plan(0, gen)

    def velocity(x, sigma):
        return gm.velocity(x, sigma)

    noise = torch.randn(ns.samples, gm.dim, generator=gen)
    units = sde.rollout(velocity, noise, plan, gen)
    samples, log_probs = units.finals, units.log_probs
    truth = gm.component_stats(gm.sample(200_000, torch.Generator().manual_seed(cfg.run.seed + 1))[0])
    got = gm.component_stats(samples)
    mass_err = (got["mass"] - truth["mass"]).abs()
    mean_err = (got["means"] - truth["means"]).abs().amax(1)
    cov_err = (got["covs"] - truth["covs"]).abs().amax((1, 2))
    tol = {"mass": 0.02, "mean": 0.05, "cov": 0.04}
    ok = bool(mass_err.max() <= tol["mass"] and mean_err.max() <= tol["mean"] and cov_err.max() <= tol["cov"])

    print(f"sampler {sde.kind} (noise_level {sde.noise_level}), plan {s.plan}: {plan.num_steps} steps, "
          f"{plan.num_sde_steps} SDE, {len(sde.trained_steps(plan))} recorded"
          + (f", {plan.num_branches} branches each" if plan.is_branching else ""))
    print(f"{len(samples)} samples of a {len(gm.weights)}-component Gaussian mixture in {gm.dim}-D, exact velocity")
    print(f"{'component':>9} {'weight':>7} {'sampled':>8} {'|mean err|':>11} {'|cov err|':>10}")
    for k in range(len(gm.weights)):
        print(f"{k:>9} {truth['mass'][k]:7.3f} {got['mass'][k]:8.3f} {mean_err[k]:11.4f} {cov_err[k]:10.4f}")
    if log_probs.numel():
        print(f"mean log-prob per recorded step (element-averaged): {log_probs.mean():.4f}")
    verdict = "match" if ok else "do NOT match"
    print(f"marginals {verdict} the target (tolerances: mass {tol['mass']}, mean {tol['mean']}, cov {tol['cov']})")
    if not ok and sde.kind == "cps":
        print("note: CPS does not preserve marginals of multi-modal data by design (see flowalign.sampling.steps)")
    if ns.out:
        report = {
            "config": {"sde_kind": sde.kind, "noise_level": sde.noise_level, "plan": s.plan, "num_steps": s.num_steps},
            "samples": len(samples), "match": ok, "tolerances": tol,
            "true_mass": truth["mass"].tolist(), "sampled_mass": got["mass"].tolist(),
            "mean_err": mean_err.tolist(), "cov_err": cov_err.tolist(),
        }
        atomic_write_json(ns.out, report)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowalign", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_cfg = sub.add_parser("config", help="inspect configurations")
    cfg_sub = p_cfg.add_subparsers(dest="config_command", required=True)
    p_show = cfg_sub.add_parser("show", help="print the resolved, validated config")
    p_show.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p_show.set_defaults(func=_cmd_config_show)
    p_keys = cfg_sub.add_parser("keys", help="list every config key with its default and help")
    p_keys.set_defaults(func=_cmd_config_keys)

    p_chk = sub.add_parser(
        "check-sampler",
        help="sample a Gaussian mixture with its exact velocity using the config's sampler and compare "
        "with the true distribution (exit 1 when the marginals do not match)",
    )
    p_chk.add_argument("args", nargs="*", metavar="[CONFIG.yaml] [key=value]")
    p_chk.add_argument("--samples", type=int, default=10_000, help="number of samples (default 10000)")
    p_chk.add_argument("--out", default=None, help="also write a JSON report here")
    p_chk.set_defaults(func=_cmd_check_sampler)

    for register in _registrars():
        register(sub)
    return parser


def _registrars():
    """``register(subparsers)`` functions of the library's parts (each imports its heavy parts lazily)."""
    from .eval.cli import register as evaluate
    from .grpo.cli import register as train
    from .noise_opt.cli import register as reno
    from .pocket.cli import register as pocket
    from .rewards.cli import register as rewards

    return [train, reno, pocket, rewards, evaluate]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    words = [parser.prog, ns.command] + [getattr(ns, a) for a in ("config_command", "pocket_command", "benchmark")
                                         if hasattr(ns, a)]
    return run_command(" ".join(words), ns.func, ns)


if __name__ == "__main__":
    sys.exit(main())
