"""Throughput of the GRPO trainer's parts on the real architectures (random weights, no hub).

    python benchmarks/throughput.py                                  # SD3.5-Medium and FLUX.1-dev on the GPU
    python benchmarks/throughput.py --arch sd35m --batch 8 --json out.json --markdown docs/throughput_<gpu>.md
    python benchmarks/throughput.py --tiny                           # the same code, small architectures, CPU

The architectures are built from the config values stored in ``benchmarks/architectures/*.json`` (the
models' own transformer/VAE/scheduler configs); text conditioning is random embeddings of the real
shapes (the text encoders are not measured). At 512² with 10 steps and CFG (SD3.5: two rows per image
in one forward; FLUX.1-dev: the embedded guidance), per architecture and mode (eager, compiled):

* ``rollout_img_s``: images/s of ``SDEPolicy.rollout`` (Flow-GRPO SDE on every step, log-probs and
  transitions recorded) + VAE decode, the trainer's rollout; ``bare_img_s``: the same number of velocity
  calls (the transformer forward with the CFG rows batched, as the stock pipeline runs it) in a plain
  Euler loop + VAE decode; ``rollout_overhead`` = bare time / rollout time inverted (target ≤ 1.10);
* ``train_ms_per_image_step``: one LoRA (r32 on the attention projections) training micro-step
  (``train_batch`` images, the architecture's default or ``--train-batch``), per image: velocity with gradients, the transition's log-prob, a policy-gradient loss, backward;
  ``train_tflop_per_image_step`` counted by ``torch.utils.flop_counter`` on that pass; ``mfu`` = counted
  FLOP/s ÷ the GPU's dense bf16 peak (``--peak-tflops``, else the table below; none on CPU);
* ``fwd_tflop_per_image``: one transformer forward of one row (no CFG), counted;
* ``peak_mem_gib_rollout`` / ``peak_mem_gib_train``: ``torch.cuda.max_memory_allocated`` (GPU only);
* ``attention``: the ``sdpa`` backend, and ``xformers`` where installed (forward time of each).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ARCHITECTURES = Path(__file__).resolve().parent / "architectures"
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}
STEPS, SIZE, LORA_RANK = 10, 512, 32


def load_architecture(name: str) -> dict:
    return json.loads((ARCHITECTURES / f"{name}.json").read_text())


def build_policy(spec: dict, device: str, dtype: torch.dtype, attention: str = "sdpa"):
    """The family's Policy around a pipeline of randomly initialised components built from ``spec`` (no
    text encoders: conditioning is given as embeddings), with a LoRA of rank 32 on the default targets."""
    import diffusers

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: FLUX.1-dev in float32 first would need 48 GB
    try:
        with torch.device(device):
            transformer = getattr(diffusers, spec["transformer"]["_class_name"]).from_config(spec["transformer"])
    finally:
        torch.set_default_dtype(default)
    with torch.device(device):
        vae = diffusers.AutoencoderKL.from_config(spec["vae"])  # float32, as the policies keep it
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(spec["scheduler"])
    if spec["family"] == "sd3":
        from flowalign.models.sd3 import SD3Policy

        pipe = diffusers.StableDiffusion3Pipeline(transformer=transformer, vae=vae, scheduler=scheduler,
                                                  text_encoder=None, tokenizer=None, text_encoder_2=None,
                                                  tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        return SD3Policy(pipe, device=device, dtype=dtype, lora_rank=LORA_RANK, lora_alpha=2.0 * LORA_RANK,
                         attention_backend=attention, collapse_null_t5=False)
    from flowalign.models.flux import FluxPolicy

    pipe = diffusers.FluxPipeline(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None,
                                  tokenizer=None, text_encoder_2=None, tokenizer_2=None)
    return FluxPolicy(pipe, device=device, dtype=dtype, lora_rank=LORA_RANK, lora_alpha=2.0 * LORA_RANK,
                      attention_backend=attention)


def random_cond(policy, spec: dict, batch: int):
    """Text conditioning of the real shapes (prompt rows, plus the unconditional rows for CFG)."""
    from flowalign.models.base import Cond

    g = torch.Generator().manual_seed(1)
    D = policy.denoiser.config.joint_attention_dim

    def rows():
        return (torch.randn(batch, spec["text"]["tokens"], D, generator=g).to(policy.device, policy.dtype),
                torch.randn(batch, spec["text"]["pooled"], generator=g).to(policy.device, policy.dtype))

    embeds, pooled = rows()
    if not policy.uses_cfg:
        return Cond(embeds, pooled)
    return Cond(embeds, pooled, *rows())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_gib(fn, device: str) -> float | None:
    if not device.startswith("cuda"):
        fn()
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def counted_tflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def measure(policy, spec: dict, *, batch: int, train_batch: int, size: int, steps: int, device: str,
            repeats: int, autocast: bool, count_flops: bool) -> dict:
    """One row of the table for the policy as it is (eager or compiled)."""
    from flowalign.config import SamplingConfig
    from flowalign.sampling.policy import SDEPolicy

    guidance = spec["guidance_scale"]
    sampling = SamplingConfig(num_steps=steps, height=size, width=size, guidance_scale=guidance)
    sigmas = policy.sigmas(steps, size, size)
    sde = SDEPolicy.from_config(sampling, sigmas)
    plan = sde.plan(0)
    cond = random_cond(policy, spec, batch)
    noise = torch.randn(batch, *policy.latent_shape(size, size), generator=torch.Generator().manual_seed(2))
    noise = noise.to(policy.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)

    def velocity(x, sigma):
        return policy.velocity(x, sigma, cond, guidance)

    @torch.no_grad()
    def rollout():
        with amp:
            units = sde.rollout(velocity, noise, plan, torch.Generator(device=policy.device).manual_seed(3))
            return units, policy.decode(units.finals)

    @torch.no_grad()
    def bare():
        with amp:
            x = noise
            for i in range(steps):
                x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i])
            return policy.decode(x)

    units, _ = rollout()
    j, m = steps // 2, train_batch  # a micro-batch of the rollout's images at one recorded step
    adv = torch.randn(m, device=policy.device)
    train_cond = cond[0:m]

    def train_step():
        with amp:
            x, x_next = units.latents[:m, j], units.next_latents[:m, j]
            v = policy.velocity(x, units.sigmas[:m, j], train_cond, guidance)
            res = sde.log_prob(x, x_next, v, units.sigmas[:m, j], units.sigmas_next[:m, j])
            loss = -(adv * res.log_prob).mean()
        loss.backward()
        for p in policy.trainable_parameters():
            p.grad = None

    t_rollout = timed(rollout, device, repeats)
    t_bare = timed(bare, device, repeats)
    t_train = timed(train_step, device, repeats)
    row = {"batch": batch, "rollout_img_s": batch / t_rollout, "bare_img_s": batch / t_bare,
           "rollout_overhead": t_rollout / t_bare, "train_batch": m, "train_ms_per_image_step": 1e3 * t_train / m,
           "peak_mem_gib_rollout": peak_gib(rollout, device), "peak_mem_gib_train": peak_gib(train_step, device)}
    if count_flops:
        cfg_rows = 2 if policy.uses_cfg and guidance > 1 else 1
        with torch.no_grad(), amp:
            fwd = counted_tflop(lambda: policy.velocity(noise[:1], sigmas[j], cond[0:1], guidance))
        row["fwd_tflop_per_image"] = fwd / cfg_rows
        row["train_tflop_per_image_step"] = counted_tflop(train_step) / m
    return row


def attention_times(policy, spec: dict, *, batch: int, size: int, device: str, repeats: int, autocast: bool) -> dict:
    """Forward time (ms per image, CFG rows included) of each attention backend available here."""
    cond = random_cond(policy, spec, batch)
    x = torch.randn(batch, *policy.latent_shape(size, size)).to(policy.device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    out = {}
    for backend in ("native", "xformers"):
        if backend == "xformers" and importlib.util.find_spec("xformers") is None:
            out["xformers"] = "not installed"
            continue
        try:
            policy.denoiser.set_attention_backend(backend)

            @torch.no_grad()
            def forward():
                with amp:
                    policy.velocity(x, 0.5, cond, spec["guidance_scale"])

            out["sdpa" if backend == "native" else backend] = 1e3 * timed(forward, device, repeats) / batch
        except Exception as err:  # a backend this build or GPU lacks is reported, not fatal
            out[backend] = f"failed: {type(err).__name__}: {err}"[:200]
    policy.denoiser.set_attention_backend("native")
    return out


def gpu_peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def run(archs: list[str], *, batch: int, size: int | None, steps: int, device: str, dtype: torch.dtype,
        modes: list[str], repeats: int, peak_tflops: float | None, train_batch: int | None = None, log=print) -> dict:
    autocast = device.startswith("cuda") and dtype == torch.bfloat16
    peak = gpu_peak_tflops(device, peak_tflops)
    result = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "dtype": str(dtype).removeprefix("torch."), "steps": steps,
              "peak_tflops": peak, "rows": []}
    for arch in archs:
        spec = load_architecture(arch)
        px = size or spec.get("image_size", SIZE)
        policy = build_policy(spec, device, dtype)
        n_params = sum(p.numel() for p in policy.denoiser.parameters())
        log(f"{arch}: {n_params / 1e9:.3f} B transformer parameters, {px}² px, batch {batch}, {steps} steps")
        attention = attention_times(policy, spec, batch=batch, size=px, device=device, repeats=repeats,
                                    autocast=autocast)
        for mode in modes:
            if mode == "compiled":
                policy.denoiser.compile()
            row = measure(policy, spec, batch=batch, train_batch=min(batch, train_batch or spec["train_batch"]),
                          size=px, steps=steps, device=device, repeats=repeats, autocast=autocast,
                          count_flops=mode == "eager")
            row.update({"arch": arch, "mode": mode, "size": px, "params_b": n_params / 1e9})
            if mode == "eager":
                row["attention_ms_per_image"] = attention
            result["rows"].append(row)
            log(json.dumps(row))
        eager = next(r for r in result["rows"] if r["arch"] == arch and r["mode"] == "eager")
        for row in result["rows"]:
            if row["arch"] != arch:
                continue
            row.setdefault("train_tflop_per_image_step", eager.get("train_tflop_per_image_step"))
            row.setdefault("fwd_tflop_per_image", eager.get("fwd_tflop_per_image"))
            flops = row["train_tflop_per_image_step"]
            row["mfu"] = flops / (row["train_ms_per_image_step"] / 1e3) / peak if peak and flops else None
            row["speedup_vs_eager"] = eager["train_ms_per_image_step"] / row["train_ms_per_image_step"]
            row["rollout_speedup_vs_eager"] = row["rollout_img_s"] / eager["rollout_img_s"]
        del policy
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return result


def markdown(result: dict) -> str:
    def f(v, spec=".3g"):
        return "–" if v is None else format(v, spec)

    lines = [f"Device: {result['device']} (torch {result['torch']}, {result['dtype']}, {result['steps']} steps, "
             f"peak {f(result['peak_tflops'])} TFLOP/s)", "",
             ("| arch | mode | px | batch (train) | rollout img/s | bare img/s | rollout/bare time | train ms/img-step | "
              "train TFLOP/img-step | MFU | fwd TFLOP/img | train speedup | peak GiB rollout/train |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['arch']} | {r['mode']} | {r['size']} | {r['batch']} ({r['train_batch']}) | {f(r['rollout_img_s'])} | "
                     f"{f(r['bare_img_s'])} | {f(r['rollout_overhead'])} | {f(r['train_ms_per_image_step'])} | "
                     f"{f(r['train_tflop_per_image_step'])} | {f(r['mfu'], '.1%') if r['mfu'] else '–'} | "
                     f"{f(r['fwd_tflop_per_image'])} | {f(r['speedup_vs_eager'])} | "
                     f"{f(r['peak_mem_gib_rollout'])}/{f(r['peak_mem_gib_train'])} |")
    attn = [f"{r['arch']}: {r['attention_ms_per_image']}" for r in result["rows"] if "attention_ms_per_image" in r]
    return "\n".join(lines + ["", "Attention backends, forward ms per image: " + "; ".join(attn), ""])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sd35m", "flux_dev"], help="architectures/*.json names")
    ap.add_argument("--tiny", action="store_true", help="small SD3- and FLUX-shaped architectures on the CPU, eager only "
                                                        "(smoke test)")
    ap.add_argument("--batch", type=int, default=8, help="images per rollout (and bare loop)")
    ap.add_argument("--train-batch", type=int, default=None,
                    help="images per LoRA training micro-batch (default: the architecture's train_batch, what fits "
                         "an 80 GB GPU without gradient checkpointing)")
    ap.add_argument("--size", type=int, default=None, help=f"pixels (default {SIZE}; the tiny architecture: 32)")
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--modes", nargs="+", default=None, choices=("eager", "compiled"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default=None)
    ap.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, for the MFU")
    ap.add_argument("--json", default=None, help="write the result here")
    ap.add_argument("--markdown", default=None, help="write the table here (e.g. docs/throughput_<gpu>.md)")
    args = ap.parse_args(argv)
    if args.tiny:
        archs, device, dtype = ["tiny_sd3", "tiny_flux"], args.device or "cpu", torch.float32
        modes = args.modes or ["eager"]
    else:
        if not torch.cuda.is_available() and args.device is None:
            print("throughput: no GPU here; run with --tiny for the CPU smoke test", file=sys.stderr)
            return 2
        archs, device, dtype = args.arch, args.device or "cuda", torch.bfloat16
        modes = args.modes or ["eager", "compiled"]
    result = run(archs, batch=args.batch, size=args.size, steps=args.steps, device=device, dtype=dtype, modes=modes,
                 repeats=args.repeats, peak_tflops=args.peak_tflops, train_batch=args.train_batch,
                 log=lambda m: print(m, file=sys.stderr))
    table = markdown(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text("# Throughput (`benchmarks/throughput.py`)\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
