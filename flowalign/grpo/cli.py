"""``flowalign train CONFIG [key=value ...]``: GRPO fine-tuning from a config file.

    flowalign train configs/pocket/flow_grpo.yaml
    flowalign train configs/pocket/flow_grpo.yaml train.lr=1e-4 run.output_dir=runs/try2
    accelerate launch -m flowalign train configs/sd35m/flow_grpo_geneval.yaml    # several GPUs

A run resumes from the latest checkpoint in ``run.output_dir`` (``--no-resume`` starts over in a
fresh folder instead). ``--dry-run`` loads everything and prints the start-up summary only.
"""

from __future__ import annotations


def _cmd_train(ns) -> int:
    from ..errors import UserError
    from .config import load_config

    if "=" in ns.config:
        raise UserError(f"the first argument {ns.config!r} must be the config file, e.g. "
                        "`flowalign train configs/pocket/flow_grpo.yaml train.lr=1e-4`")
    overrides = list(ns.overrides)
    if ns.no_resume:
        overrides.append("run.resume=false")
    cfg = load_config(ns.config, overrides)  # finds the recipe's prompt files from any folder
    from pathlib import Path

    out = Path(cfg.run.output_dir)
    if not cfg.run.resume and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("iter_*")):
        raise UserError(f"run.output_dir={str(out)!r} already holds checkpoints of another run; resume it "
                        "(drop --no-resume) or choose a new run.output_dir")
    from .trainer import GRPOTrainer

    with GRPOTrainer(cfg) as trainer:  # checks folder, device, prompts and rewards before loading the model
        if ns.dry_run:
            for k, v in trainer.summary().items():
                print(f"{k}: {v}")
            return 0
        result = trainer.train()
    if trainer.is_main:
        shown = {k: round(v, 4) for k, v in result.items() if isinstance(v, float) and not k.startswith("time/")}
        print(f"done: {cfg.train.num_iterations} iterations; final weights in {out / 'final'}")
        if shown:
            print("last eval: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return 0


def register(sub) -> None:
    p = sub.add_parser("train", help="GRPO fine-tuning from a config file (resumes from run.output_dir)")
    p.add_argument("config", help="YAML config, e.g. configs/pocket/flow_grpo.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.lr=1e-4")
    p.add_argument("--no-resume", action="store_true", help="do not resume; refuse an output_dir with checkpoints")
    p.add_argument("--dry-run", action="store_true", help="load model, rewards and prompts; print the summary; exit")
    p.set_defaults(func=_cmd_train)
