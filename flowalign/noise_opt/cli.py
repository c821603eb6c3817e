"""``flowalign reno``: optimize the initial noise of one prompt (or of each prompt of a file).

    flowalign reno --prompt "two red circles"                          the pocket model, seconds on a CPU
    flowalign reno --prompt "a cat" --config configs/reno/sd_turbo.yaml optim.lr=2 run.seed=3
    flowalign reno --prompts prompts/pocket/test.txt run.batch_size=16 search.method=carinox
    flowalign reno --prompt "a cat" --rewards hpsv2.1=5,pickscore=0.05 --seeds 0,1,2 --out runs/cat

Writes, per prompt (and seed), a folder ``<out>/<name>`` (``name``: the prompt's slug and a hash of it,
``output_name``; ``<index>_<name>`` for a prompt file, ``_seed<s>`` appended with several seeds) holding ``initial.png``, ``best.png``, ``log.json``
(per-iteration rewards, losses, noise norm) and with ``run.save_every_iteration`` ``iterations/*.png``;
plus ``<out>/config.yaml`` and ``<out>/summary.json``. ``register(subparsers)`` adds the command to
the ``flowalign`` parser; ``python -m flowalign.noise_opt.cli ...`` runs it alone.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys

from ..errors import UserError, run_command

PROG = "flowalign reno"


def slugify(prompt: str, max_len: int = 60) -> str:
    """A file-name-safe form of a prompt: lower case, runs of other characters as ``_``."""
    slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:max_len].rstrip("_")
    return slug or "prompt"


def output_name(prompt: str) -> str:
    """The folder name of a prompt's results: its slug (readable, no path separators or dots) and
    the first 8 hex digits of the SHA-256 of the full prompt, so prompts that slug alike (``/`` and
    ``..``, or long prompts that differ after 48 characters) never share a folder."""
    return f"{slugify(prompt, 48)}_{hashlib.sha256(prompt.encode()).hexdigest()[:8]}"


def parse_rewards(text: str) -> list[dict]:
    """``name[=weight],...`` → reward specs, e.g. ``hpsv2.1=5,pickscore=0.05,clip`` (weight 1 when
    omitted; a name may be a dotted path ``package.module:callable``)."""
    specs = []
    for part in [p.strip() for p in text.split(",")]:
        name, has_weight, weight = part.partition("=")
        name = name.strip()
        if not name:
            raise UserError(f"--rewards {text!r} has an entry without a reward name; write name[=weight],... "
                             "e.g. hpsv2.1=5,pickscore=0.05")
        try:
            w = float(weight) if has_weight else 1.0
        except ValueError:
            raise UserError(f"--rewards entry {part!r}: weight {weight!r} is not a number; write name=weight, "
                             "e.g. pickscore=0.05") from None
        specs.append({"name": name, "weight": w, "args": {}})
    return specs


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {text!r} repeats a seed")
    return seeds


def _load(ns):
    """(config, prompts, metadata, seeds) from the command line; ValueError on any user mistake."""
    from .config import load_noise_opt_config

    if ns.prompt is not None:
        if not ns.prompt.strip():
            raise UserError("--prompt is empty; give the text to generate, e.g. --prompt \"two red circles\"")
        prompts, metadata = [ns.prompt.strip()], None
    else:
        from ..prompts import read_prompts

        metadata = read_prompts(ns.prompts)
        prompts = [row["prompt"].strip() for row in metadata]
    overrides = list(ns.overrides)
    if ns.out is not None:
        overrides.append(f"run.output_dir={ns.out}")
    cfg = load_noise_opt_config(ns.config, overrides)
    if ns.rewards is not None:
        from ..config import RewardSpec

        cfg.rewards = [RewardSpec(**s) for s in parse_rewards(ns.rewards)]
    seeds = parse_seeds(ns.seeds) if ns.seeds is not None else [cfg.run.seed]
    return cfg, prompts, metadata, seeds


def _run(cfg, prompts, metadata, seeds, source: str = "") -> list[dict]:
    import torch
    from omegaconf import OmegaConf

    from ..errors import check_output_dir
    from ..io import atomic_write_json, atomic_write_text, save_image_grid
    from ..models import check_model_files, load_policy
    from ..rewards import build_rewards
    from ..rewards.base import check_prompts
    from ..torch_utils import resolve_device
    from .runner import generator_calls, search_batch

    out = check_output_dir(cfg.run.output_dir, "run.output_dir")
    if cfg.model.device != "auto":
        resolve_device(cfg.model.device, "model.device")
    check_model_files(cfg.model)
    rewards = build_rewards(cfg.rewards)  # before the model: a reward typo fails fast
    if cfg.search.method != "best_of_n":
        bad = [k for k, r in zip(rewards.keys, rewards.rewards) if not r.differentiable]
        if bad:
            raise UserError(f"search.method={cfg.search.method} needs differentiable rewards; {bad} is not "
                             "(use search.method=best_of_n, or differentiable rewards such as clip, hpsv2.1, "
                             "pickscore, imagereward, aesthetic, pocket_clip)")
    check_prompts(rewards, metadata if metadata is not None else [{"prompt": p} for p in prompts],
                  "--prompts " + source if metadata is not None else "--prompt")
    if cfg.search.category_weights:  # CARINOX: per-prompt reward weights by category
        from .categories import category_aware

        rewards = category_aware(rewards, cfg.search, metadata)
    model_cfg = cfg.model
    policy = load_policy(model_cfg)
    g, s = cfg.generation, cfg.search
    calls = generator_calls(cfg)
    print(f"{PROG}: {cfg.model.family} {model_cfg.path} ({cfg.model.dtype}, {policy.device}); "
          f"{g.height}x{g.width}, {g.num_steps} step(s), guidance {g.guidance_scale}; rewards {rewards!r}; "
          f"{s.method}: {calls} generator calls per prompt and seed; {len(prompts)} prompt(s) x {len(seeds)} seed(s), "
          f"batch {cfg.run.batch_size}", file=sys.stderr)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))

    single = len(prompts) == 1
    summaries = []
    for seed in seeds:
        for start in range(0, len(prompts), cfg.run.batch_size):
            chunk = prompts[start:start + cfg.run.batch_size]
            meta = None if metadata is None else metadata[start:start + cfg.run.batch_size]
            dirs = []
            for i, p in enumerate(chunk):
                name = output_name(p) if single else f"{start + i:04d}_{output_name(p)}"
                dirs.append(out / (name + (f"_seed{seed}" if len(seeds) > 1 else "")))

            def save_iteration(it, images, records, dirs=dirs):
                for d, img in zip(dirs, images):
                    save_image_grid(d / "iterations" / f"{it:04d}.png", img[None], nrow=1, scale=cfg.run.image_scale)

            results = search_batch(policy, rewards, chunk, cfg, seed=seed, offset=start, metadata=meta,
                                   on_iteration=save_iteration if cfg.run.save_every_iteration else None)
            for d, r in zip(dirs, results):
                save_image_grid(d / "initial.png", r.initial_image[None], nrow=1, scale=cfg.run.image_scale)
                save_image_grid(d / "best.png", r.best_image[None], nrow=1, scale=cfg.run.image_scale)
                if cfg.run.save_noise:
                    torch.save(r.best_noise.clone(), d / "best_noise.pt")
                summary = {**r.summary(), "seed": seed, "folder": str(d)}
                atomic_write_json(d / "log.json", {**summary, "history": r.history})
                summaries.append(summary)
                print(f"{r.prompt!r} seed {seed}: reward {r.initial_reward:.4f} -> {r.best_reward:.4f} "
                      f"(best at call {r.best_iteration + 1}/{r.generator_calls}, {r.seconds:.1f} s); wrote {d}")
    atomic_write_json(out / "summary.json", {"method": s.method, "generator_calls_per_prompt": calls,
                                             "results": summaries})
    return summaries


def _cmd_reno(ns) -> int:
    if ns.keys:
        from .config import describe_noise_opt

        rows = describe_noise_opt()
        width = max(len(k) for k, _, _ in rows)
        for key, default, help_ in rows:
            print(f"{key:<{width}}  {help_}  [default: {default}]")
        return 0
    cfg, prompts, metadata, seeds = _load(ns)
    _run(cfg, prompts, metadata, seeds, source=ns.prompts or "")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt to optimize an image for")
    what.add_argument("--prompts", metavar="FILE",
                      help="a prompt file: .txt (one per line) or .jsonl (rows with 'prompt')")
    what.add_argument("--keys", action="store_true", help="list every config key with its default and help, and exit")
    p.add_argument("--config", default=None, help="YAML recipe, e.g. configs/reno/sd_turbo.yaml "
                                                  "(default: the pocket model with pocket_clip)")
    p.add_argument("--rewards", default=None, metavar="NAME[=W],...",
                   help="replace the config's rewards, e.g. hpsv2.1=5,pickscore=0.05,imagereward=1")
    p.add_argument("--seeds", default=None, metavar="S,...", help="run each prompt once per seed (default run.seed)")
    p.add_argument("--out", default=None, help="output folder (sets run.output_dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. optim.lr=2 optim.iterations=20 search.method=carinox")


def register(subparsers) -> None:
    """Add ``reno`` to an argparse subparsers object (imports nothing heavy)."""
    p = subparsers.add_parser(
        "reno", help="optimize the initial noise of a prompt against differentiable rewards "
                     "(ReNO, Best-of-N, CARINOX); writes initial/best images and a JSON log",
        description="Optimize the initial noise of a prompt (or of each prompt of a file) against "
                    "differentiable rewards; no weight changes.",
        epilog="examples:\n" + __doc__.split("\n\n")[1].strip("\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=_cmd_reno)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flowalign")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return run_command(PROG, ns.func, ns)


if __name__ == "__main__":
    sys.exit(main())
