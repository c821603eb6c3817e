"""The bad-input corpus: what a new user gets wrong, against every command, run as the CLI runs it.

Each case builds its bad input in a fresh folder and runs ``flowalign.cli.main(argv)`` in-process.
It must exit with code 2 and print exactly one line on stderr, ``flowalign <command>: error: ...``,
that names the culprit (file or key) and says what to do; no traceback, and nothing written: the
folder holds afterwards exactly what the case put there. The checks run before any model is loaded,
so the whole corpus takes seconds. A few cases need a separate interpreter (a missing extra).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import flowalign
from flowalign.cli import main
from flowalign.models.testing import force_hub_offline

force_hub_offline()

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = Path(flowalign.__file__).parent / "pocket" / "weights"
HAS_CUDA = __import__("torch").cuda.is_available()
READ_ONLY = "/sys/flowalign_out"  # a read-only file system, even for root (a chmod'ed folder is not)
GOOD_PROMPTS = "two red circles\na blue square above a green triangle\n"

# A tiny `flowalign train` config on the shipped pocket model; cases change one thing.
TRAIN_CFG = {
    "model": {"family": "sd3", "path": "builtin:pocket", "dtype": "float32", "device": "cpu", "lora_rank": 4,
              "lora_alpha": 4},
    "sampling": {"num_steps": 2, "height": 32, "width": 32, "plan": "full", "eval_num_steps": 2},
    "train": {"prompts": "PROMPTS", "group_size": 2, "prompts_per_iteration": 1, "num_iterations": 1,
              "micro_batch_size": 2},
    "rewards": [{"name": "pocket_gold", "args": {"score": "partial"}}],
    "run": {"output_dir": "OUT", "tracker": "none", "progress": False},
}


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data)
    return path


def _config(tmp: Path, *, prompts: str | None = GOOD_PROMPTS, prompts_name="prompts.txt", **sections) -> Path:
    """``tmp/cfg.yaml``: TRAIN_CFG with ``sections`` merged in (a section value None deletes it)."""
    cfg = json.loads(json.dumps(TRAIN_CFG))
    if prompts is not None:
        cfg["train"]["prompts"] = str(_write(tmp / prompts_name, prompts))
    cfg["run"]["output_dir"] = str(tmp / "out")
    for name, value in sections.items():
        if value is None:
            cfg.pop(name)
        elif isinstance(value, dict) and isinstance(cfg.get(name), dict):
            cfg[name].update(value)
        else:
            cfg[name] = value
    return _write(tmp / "cfg.yaml", yaml.safe_dump(cfg))


def _damaged_model(tmp: Path, component: str, how: str) -> Path:
    """A copy of the shipped pocket T2I whose ``component`` weight file is truncated or garbage."""
    folder = tmp / "model"
    shutil.copytree(WEIGHTS / "t2i", folder)
    f = next((folder / component).glob("*.safetensors"))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if how == "truncated" else b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    return folder


def _mkdir(folder: Path) -> list:
    folder.mkdir(parents=True)
    return []


def _eval(tmp: Path, *args) -> list:
    """``pocket eval`` on a small good prompt file with ``args``."""
    return ["pocket", "eval", "--prompts", str(_write(tmp / "good.txt", GOOD_PROMPTS)), *args]


def _lora(tmp: Path, how: str) -> Path:
    """A LoRA folder: ``missing`` (a path that does not exist) or ``truncated`` (a cut weights file)."""
    folder = tmp / "lora"
    if how == "truncated":
        _write(folder / "pytorch_lora_weights.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": ")
    return folder


# --------------------------------------------------------------------------------------------------
# the corpus: id -> (setup(tmp) -> argv, words the message must contain)
# Each list of words names the culprit and the fix.

def train(*overrides, **sections):
    return lambda tmp: ["train", str(_config(tmp, **sections)), *overrides]


def train_prompts(content, name="prompts.txt", *overrides):
    return lambda tmp: ["train", str(_config(tmp, prompts=content, prompts_name=name)), *overrides]


CASES = {
    # ---- flowalign train: the config file
    "train/config-missing": (lambda tmp: ["train", str(tmp / "nope.yaml")], ["nope.yaml", "not found", "give a path"]),
    "train/config-not-yaml": (lambda tmp: ["train", str(_write(tmp / "c.yaml", "model: [unclosed\n"))],
                              ["c.yaml", "not valid YAML"]),
    "train/config-empty": (lambda tmp: ["train", str(_write(tmp / "c.yaml", ""))], ["c.yaml", "is empty", "sections"]),
    "train/config-only-comments": (lambda tmp: ["train", str(_write(tmp / "c.yaml", "# nothing\n"))],
                                   ["c.yaml", "is empty"]),
    "train/config-a-list": (lambda tmp: ["train", str(_write(tmp / "c.yaml", "- a\n- b\n"))],
                            ["c.yaml", "mapping of sections"]),
    "train/config-is-a-folder": (lambda tmp: ["train", str(tmp)], ["not found", "YAML file"]),
    "train/override-first": (lambda tmp: ["train", "train.lr=1"], ["train.lr=1", "config file"]),
    "train/unknown-key": (train("train.lrr=1e-4"), ["train.lrr", "did you mean 'train.lr'"]),
    "train/unknown-section": (train("trian.lr=1"), ["trian", "valid keys"]),
    "train/bad-override": (train("train.lr"), ["train.lr", "key=value"]),
    "train/lr-inf": (train("train.lr=inf"), ["train.lr", "finite"]),
    "train/lr-nan": (train("train.lr=nan"), ["train.lr", "finite"]),
    "train/clip-range-inf": (train("train.clip_range=inf"), ["train.clip_range", "finite"]),
    "train/kl-beta-nan": (train("train.kl_beta=nan"), ["train.kl_beta", "finite"]),
    "train/noise-level-nan": (train("sampling.noise_level=nan"), ["sampling.noise_level", "finite"]),
    "train/guidance-inf": (train("sampling.guidance_scale=inf"), ["sampling.guidance_scale", "finite"]),
    "train/reward-weight-inf": (train(rewards=[{"name": "pocket_gold", "weight": float("inf")}]),
                                ["rewards[0].weight", "finite"]),
    "train/lora-alpha-nan": (train("model.lora_alpha=nan"), ["model.lora_alpha", "finite"]),
    "train/lr-not-a-number": (train("train.lr=fast"), ["train.lr", "fix the value"]),
    "train/group-size-1": (train("train.group_size=1"), ["train.group_size", ">= 2"]),
    "train/dtype-choice": (train("model.dtype=float64"), ["model.dtype", "choose one of"]),
    "train/no-rewards": (train(rewards=[]), ["rewards is empty", "give at least one"]),
    # ---- train: prompt files
    "train/prompts-missing": (train("train.prompts=/nonexistent/p.txt"), ["/nonexistent/p.txt", "does not exist"]),
    "train/prompts-not-utf8": (train_prompts(b"two red circles\n\xff\xfe caf\xe9\n"), ["prompts.txt:2", "UTF-8"]),
    "train/prompts-md": (train_prompts("two red circles\n", "prompts.md"), ["prompts.md", "must end in .txt"]),
    "train/prompts-empty": (train_prompts("\n# only a comment\n"), ["prompts.txt", "has no prompts"]),
    "train/prompts-bad-json": (train_prompts('{"prompt": "two red circles"\n', "p.jsonl"), ["p.jsonl:1", "not valid JSON"]),
    "train/prompts-jsonl-no-prompt": (train_prompts('{"spec": {}}\n', "p.jsonl"), ["p.jsonl:1", "'prompt'"]),
    "train/prompts-outside-grammar": (train_prompts("two red circles\na cat on a mat\n"),
                                      ["prompts.txt", "pocket_gold", "'a cat on a mat'", "choose another reward"]),
    "train/jsonl-no-spec-outside-grammar": (train_prompts('{"prompt": "a photo of a dog"}\n', "p.jsonl"),
                                            ["p.jsonl", "pocket_gold", "a photo of a dog", "prompts/pocket"]),
    "train/jsonl-bad-spec": (train_prompts('{"prompt": "two red circles", "spec": {"shape": "circle"}}\n', "p.jsonl"),
                             ["p.jsonl", "pocket_gold", "two red circles"]),
    "train/eval-prompts-outside-grammar": (
        lambda tmp: ["train", str(_config(tmp, eval={"prompts": str(_write(tmp / "ev.txt", "a dog\n"))})),
                     "eval.every=1"], ["eval.prompts", "ev.txt", "pocket_gold", "'a dog'"]),
    # ---- train: output folder, device, model files
    "train/out-is-a-file": (lambda tmp: ["train", str(_config(tmp)), f"run.output_dir={_write(tmp / 'f', 'x')}"],
                            ["run.output_dir", "is a file", "choose a folder"]),
    "train/out-under-a-file": (lambda tmp: ["train", str(_config(tmp)), f"run.output_dir={_write(tmp / 'f', 'x')}/run"],
                               ["run.output_dir", "which is a file", "choose a folder"]),
    "train/out-read-only": (train(f"run.output_dir={READ_ONLY}"), ["run.output_dir", "/sys", "cannot write",
                                                                  "choose a folder you can write to"]),
    "train/device-cuda": (train("model.device=cuda"), ["model.device='cuda'", "no CUDA GPU", "model.device=cpu"]),
    "train/device-cuda-7": (train("model.device=cuda:7"), ["model.device='cuda:7'", "model.device=cpu"]),
    "train/device-not-a-device": (train("model.device=gpu"), ["model.device='gpu'", "not a device", "use auto, cpu"]),
    "train/model-path-missing": (train("model.path=/nonexistent/model"), ["/nonexistent/model", "does not exist",
                                                                          "model.path"]),
    "train/model-path-not-pipeline": (lambda tmp: ["train", str(_config(tmp)), f"model.path={tmp}"],
                                      ["model_index.json", "Point model.path"]),
    "train/model-path-is-a-file": (lambda tmp: ["train", str(_config(tmp)), f"model.path={_write(tmp / 'w.bin', 'x')}"],
                                   ["w.bin", "is a file", "model.path"]),
    "train/weights-truncated": (lambda tmp: ["train", str(_config(tmp)),
                                             f"model.path={_damaged_model(tmp, 'transformer', 'truncated')}"],
                                ["model.path", "diffusion_pytorch_model.safetensors", "truncated", "rebuild"]),
    "train/text-encoder-garbage": (lambda tmp: ["train", str(_config(tmp)),
                                                f"model.path={_damaged_model(tmp, 'text_encoder', 'garbage')}"],
                                   ["model.path", "text_encoder", "no valid safetensors header"]),
    "train/lora-init-missing": (lambda tmp: ["train", str(_config(tmp)), f"model.lora_init_path={_lora(tmp, 'missing')}"],
                                ["model.lora_init_path", "not a folder", "save_adapter"]),
    "train/lora-init-truncated": (lambda tmp: ["train", str(_config(tmp)),
                                               f"model.lora_init_path={_lora(tmp, 'truncated')}"],
                                  ["model.lora_init_path", "pytorch_lora_weights.safetensors", "damaged"]),
    "train/flux-family-on-pocket": (train("model.family=flux"), ["builtin:pocket", "sd3"]),
    "train/reward-unknown": (train(rewards=[{"name": "pocket_gld"}]), ["pocket_gld", "Did you mean 'pocket_gold'"]),
    "train/reward-bad-args": (train(rewards=[{"name": "pocket_gold", "args": {"scor": "exact"}}]),
                              ["pocket_gold", "scor", "its arguments are"]),
    "train/reward-bad-score": (train(rewards=[{"name": "pocket_gold", "args": {"score": "best"}}]),
                               ["pocket gold score 'best'", "use 'partial'"]),
    "train/reward-bad-module": (train(rewards=[{"name": "no_such_pkg.mod:fn"}]), ["no_such_pkg", "cannot import"]),
    "train/no-resume-with-checkpoints": (
        lambda tmp: ["train", str(_config(tmp)), "--no-resume"] + _mkdir(tmp / "out/checkpoints/iter_1"),
        ["already holds checkpoints", "choose a new run.output_dir"]),
    # ---- flowalign reno
    "reno/empty-prompt": (lambda tmp: ["reno", "--prompt", "  ", "--out", str(tmp / "out")], ["--prompt", "is empty"]),
    "reno/prompts-missing": (lambda tmp: ["reno", "--prompts", str(tmp / "p.txt"), "--out", str(tmp / "out")],
                             ["p.txt", "does not exist"]),
    "reno/prompts-not-utf8": (lambda tmp: ["reno", "--prompts", str(_write(tmp / "p.txt", b"\xe9t\xe9\n")),
                                           "--out", str(tmp / "out")], ["p.txt:1", "UTF-8"]),
    "reno/rewards-no-name": (lambda tmp: ["reno", "--prompt", "a red circle", "--rewards", "=3", "--out",
                                          str(tmp / "out")], ["--rewards", "without a reward name"]),
    "reno/rewards-bad-weight": (lambda tmp: ["reno", "--prompt", "a red circle", "--rewards", "pocket_clip=lots",
                                             "--out", str(tmp / "out")], ["pocket_clip=lots", "not a number"]),
    "reno/rewards-unknown": (lambda tmp: ["reno", "--prompt", "a red circle", "--rewards", "pocket_clp",
                                          "--out", str(tmp / "out")], ["pocket_clp", "Did you mean 'pocket_clip'"]),
    "reno/seeds-not-ints": (lambda tmp: ["reno", "--prompt", "a red circle", "--seeds", "1,x", "--out",
                                         str(tmp / "out")], ["--seeds", "comma-separated integers"]),
    "reno/seeds-repeat": (lambda tmp: ["reno", "--prompt", "a red circle", "--seeds", "1,1", "--out",
                                       str(tmp / "out")], ["--seeds", "repeats a seed"]),
    "reno/not-differentiable": (lambda tmp: ["reno", "--prompt", "a red circle", "--rewards", "pocket_gold",
                                             "--out", str(tmp / "out")], ["needs differentiable rewards",
                                                                          "search.method=best_of_n"]),
    "reno/gold-outside-grammar": (lambda tmp: ["reno", "--prompt", "a cat", "--rewards", "pocket_gold",
                                               "search.method=best_of_n", "--out", str(tmp / "out")],
                                  ["--prompt", "pocket_gold", "'a cat'"]),
    "reno/gold-file-outside-grammar": (lambda tmp: ["reno", "--prompts", str(_write(tmp / "p.txt", "a red circle\nhi\n")),
                                                    "--rewards", "pocket_gold", "search.method=best_of_n",
                                                    "--out", str(tmp / "out")], ["p.txt", "pocket_gold", "'hi'"]),
    "reno/out-is-a-file": (lambda tmp: ["reno", "--prompt", "a red circle", "--out", str(_write(tmp / "f", "x"))],
                           ["run.output_dir", "is a file"]),
    "reno/out-read-only": (lambda tmp: ["reno", "--prompt", "a red circle", "--out", READ_ONLY],
                           ["run.output_dir", "cannot write"]),
    "reno/device-cuda": (lambda tmp: ["reno", "--prompt", "a red circle", "--out", str(tmp / "out"), "model.device=cuda"],
                         ["model.device='cuda'", "no CUDA GPU"]),
    "reno/lr-inf": (lambda tmp: ["reno", "--prompt", "a red circle", "--out", str(tmp / "out"), "optim.lr=inf"],
                    ["optim.lr", "finite"]),
    "reno/unknown-key": (lambda tmp: ["reno", "--prompt", "a red circle", "--out", str(tmp / "out"), "optim.lrr=1"],
                         ["optim.lrr", "did you mean 'optim.lr'"]),
    "reno/config-empty": (lambda tmp: ["reno", "--prompt", "a red circle", "--config", str(_write(tmp / "c.yaml", "")),
                                       "--out", str(tmp / "out")], ["c.yaml", "is empty"]),
    "reno/config-missing": (lambda tmp: ["reno", "--prompt", "a red circle", "--config", str(tmp / "c.yaml"),
                                         "--out", str(tmp / "out")], ["c.yaml", "not found"]),
    "reno/weights-truncated": (lambda tmp: ["reno", "--prompt", "a red circle", "--out", str(tmp / "out"),
                                            f"model.path={_damaged_model(tmp, 'vae', 'truncated')}"],
                               ["vae", "diffusion_pytorch_model.safetensors", "truncated"]),
    # ---- flowalign pocket eval / render / build
    "eval/prompts-missing": (lambda tmp: ["pocket", "eval", "--prompts", str(tmp / "p.jsonl"), "--out", str(tmp / "o")],
                             ["p.jsonl", "does not exist"]),
    "eval/prompts-not-utf8": (lambda tmp: ["pocket", "eval", "--prompts", str(_write(tmp / "p.txt", b"a red circle\n\x81\n")),
                                           "--out", str(tmp / "o")], ["p.txt:2", "UTF-8"]),
    "eval/prompts-outside-grammar": (lambda tmp: ["pocket", "eval", "--prompts", str(_write(tmp / "p.txt", "a cat\n")),
                                                  "--out", str(tmp / "o")], ["p.txt:1", "cannot parse pocket prompt"]),
    "eval/prompts-bad-spec": (lambda tmp: ["pocket", "eval", "--prompts",
                                           str(_write(tmp / "p.jsonl", '{"prompt": "a red circle", "spec": {"x": 1}}\n')),
                                           "--out", str(tmp / "o")], ["p.jsonl:1", "not a pocket scene spec"]),
    "eval/model-missing": (lambda tmp: _eval(tmp, "--model", str(tmp / "m"), "--out", str(tmp / "o")),
                           ["does not exist", "model.path"]),
    "eval/model-truncated": (lambda tmp: _eval(tmp, "--model", str(_damaged_model(tmp, "transformer", "truncated")),
                                          "--out", str(tmp / "o")), ["diffusion_pytorch_model.safetensors", "truncated"]),
    "eval/lora-missing": (lambda tmp: _eval(tmp, "--lora", str(tmp / "l"), "--out", str(tmp / "o")),
                          ["--lora", "not a folder"]),
    "eval/lora-truncated": (lambda tmp: _eval(tmp, "--lora", str(_lora(tmp, "truncated")), "--out", str(tmp / "o")),
                            ["--lora", "pytorch_lora_weights.safetensors", "damaged"]),
    "eval/out-is-a-file": (lambda tmp: _eval(tmp, "--out", str(_write(tmp / "o", "x"))), ["--out", "is a file"]),
    "eval/out-read-only": (lambda tmp: _eval(tmp, "--out", READ_ONLY), ["--out", "cannot write"]),
    "eval/steps-zero": (lambda tmp: _eval(tmp, "--steps", "0", "--out", str(tmp / "o")), ["--steps", "1 or more"]),
    "eval/limit-zero": (lambda tmp: _eval(tmp, "--limit-per-category", "0", "--out", str(tmp / "o")),
                        ["--limit-per-category", "1 or more"]),
    "eval/guidance-nan": (lambda tmp: _eval(tmp, "--guidance", "nan", "--out", str(tmp / "o")),
                          ["--guidance", ">= 0"]),
    "render/outside-grammar": (lambda tmp: ["pocket", "render", "a cat", "--out", str(tmp / "x.png")],
                               ["cannot parse pocket prompt 'a cat'"]),
    "render/count-too-high": (lambda tmp: ["pocket", "render", "nine red circles", "--out", str(tmp / "x.png")],
                              ["nine"]),
    "render/out-under-a-file": (lambda tmp: ["pocket", "render", "a red circle", "--out", f"{_write(tmp / 'f', 'x')}/x.png"],
                                ["--out", "is a file"]),
    "render/scale-zero": (lambda tmp: ["pocket", "render", "a red circle", "--scale", "0", "--out", str(tmp / "x.png")],
                          ["--scale", "1 or more"]),
    "render/size-too-small": (lambda tmp: ["pocket", "render", "a red circle", "--size", "8", "--out", str(tmp / "x.png")],
                              ["size 8", "too small"]),
    "build/unknown-setting": (lambda tmp: ["pocket", "build", "--quick", "--out", str(tmp / "o"), "--work", str(tmp / "w"),
                                           "--set", "t2i_stepz=3"], ["t2i_stepz"]),
    "build/out-is-a-file": (lambda tmp: ["pocket", "build", "--quick", "--out", str(_write(tmp / "o", "x")),
                                         "--work", str(tmp / "w")], ["--out", "is a file"]),
    "build/work-read-only": (lambda tmp: ["pocket", "build", "--quick", "--out", str(tmp / "o"), "--work", READ_ONLY],
                             ["--work", "cannot write"]),
    "build/prompts-missing": (lambda tmp: ["pocket", "build", "--quick", "--out", str(tmp / "o"), "--work", str(tmp / "w"),
                                           "--prompts", str(tmp / "p.jsonl")], ["p.jsonl", "does not exist"]),
    # ---- flowalign judge-server, config show, check-sampler
    "judge/reward-args-not-json": (lambda tmp: ["judge-server", "--reward-args", "{score: 1}", "--port", "0"],
                                   ["--reward-args", "JSON"]),
    "judge/reward-args-a-list": (lambda tmp: ["judge-server", "--reward-args", "[1]", "--port", "0"],
                                 ["--reward-args", "JSON object"]),
    "judge/error-rate": (lambda tmp: ["judge-server", "--error-rate", "2", "--port", "0"], ["--error-rate", "[0, 1]"]),
    "judge/api-key-unset": (lambda tmp: ["judge-server", "--api-key-env", "FLOWALIGN_NO_SUCH_KEY_VAR", "--port", "0"],
                            ["FLOWALIGN_NO_SUCH_KEY_VAR", "empty or unset"]),
    "judge/reward-unknown": (lambda tmp: ["judge-server", "--reward", "pocket_gld", "--port", "0"],
                             ["pocket_gld", "Did you mean"]),
    "config-show/lr-inf": (lambda tmp: ["config", "show", "train.lr=inf"], ["train.lr", "finite"]),
    "config-show/window-range-nan": (lambda tmp: ["config", "show", "sampling.window_range=[0,nan]"],
                                     ["sampling.window_range"]),
    "check-sampler/out-under-a-file": (lambda tmp: ["check-sampler", "--samples", "10", "--out",
                                                    f"{_write(tmp / 'f', 'x')}/r.json"], ["--out", "is a file"]),
    "check-sampler/noise-level-nan": (lambda tmp: ["check-sampler", "sampling.noise_level=nan"],
                                      ["sampling.noise_level", "finite"]),
}


PROGS = {"train": "flowalign train", "reno": "flowalign reno", "eval": "flowalign pocket eval",
         "render": "flowalign pocket render", "build": "flowalign pocket build", "judge": "flowalign judge-server",
         "config-show": "flowalign config show", "check-sampler": "flowalign check-sampler"}


def _listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, tmp_path, capsys, monkeypatch):
    if "cuda" in case and HAS_CUDA:
        pytest.skip("this machine has a GPU")
    monkeypatch.chdir(tmp_path)
    setup, words = CASES[case]
    argv = setup(tmp_path)
    before = _listing(tmp_path)
    rc = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, f"exit {rc}; stderr: {err}"
    assert len(lines) == 1, f"want one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{PROGS[case.split('/')[0]]}: error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} missing from: {lines[0]}"
    assert _listing(tmp_path) == before, "the failed command left files behind"


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 60


def test_a_bug_keeps_its_traceback(tmp_path):
    """Only expected failures become one line: an error inside our code is not swallowed."""
    from flowalign.errors import run_command

    def buggy(ns):
        return [][1]

    with pytest.raises(IndexError):
        run_command("flowalign x", buggy, None)
    with pytest.raises(ValueError):  # a plain ValueError is a bug, not a user error
        run_command("flowalign x", lambda ns: int("x"), None)


def _missing_extra(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter where importing httpx fails, as without the [vlm] extra."""
    prelude = "import sys; sys.modules['httpx'] = None\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, env=env, cwd=Path.cwd())


def test_pref_grpo_http_without_the_vlm_extra(tmp_path):
    cfg = _config(tmp_path, rewards=[{"name": "win_rate", "args": {"judge": "vlm", "judge_args": {
        "endpoint": "http://127.0.0.1:9/v1", "model": "m"}}}])
    before = _listing(tmp_path)
    r = _missing_extra(f"from flowalign.cli import main; sys.exit(main(['train', {str(cfg)!r}]))")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "httpx" in lines[0] and "pip install 'flowalign[vlm]'" in lines[0], r.stderr
    assert _listing(tmp_path) == before


def test_subprocess_cli_reports_one_line(tmp_path):
    """The installed entry point (python -m flowalign) behaves like main()."""
    r = subprocess.run([sys.executable, "-m", "flowalign", "pocket", "render", "a cat", "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot parse pocket prompt" in r.stderr
    assert not (tmp_path / "x.png").exists()
