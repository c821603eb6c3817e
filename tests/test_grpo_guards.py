"""The GRPO trainer when things go wrong: non-finite numbers, corrupt or incompatible checkpoints, a
killed checkpoint write, a judge that fails; and a stopped + resumed run bit-identical to an
uninterrupted one with the text-embedding cache on."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from flowalign.config import load_config
from flowalign.grpo.logging import read_metrics
from flowalign.grpo.state import TrainingStopped
from flowalign.grpo.trainer import GRPOTrainer
from flowalign.models.testing import MAX_SEQUENCE_LENGTH, force_hub_offline, tiny_pipeline_dir

force_hub_offline()
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a red cat", "a blue dog on a cube", "two green birds", "a yellow car", "a purple hat", "an orange fish"]


def tiny_config(tmp_path: Path, out: str = "run", **sections) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = {
        "model": {"family": "sd3", "path": str(tiny_pipeline_dir("sd3")), "dtype": "float32", "device": "cpu",
                  "lora_rank": 4, "lora_alpha": 8.0, "max_sequence_length": MAX_SEQUENCE_LENGTH},
        "sampling": {"num_steps": 3, "height": 32, "width": 32, "guidance_scale": 2.0},
        "train": {"prompts": str(prompts), "group_size": 4, "prompts_per_iteration": 2, "micro_batch_size": 4,
                  "num_iterations": 4, "mixed_precision": "fp32", "lr": 1e-2, "clip_range": 0.2, "ema": True},
        "rewards": [{"name": "jpeg_incompressibility"}],
        "run": {"output_dir": str(tmp_path / out), "tracker": "none", "progress": False, "save_every": 1},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return load_config(path)


def _quiet(cfg):
    return GRPOTrainer(cfg, log=lambda *_: None)


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _final_lora(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final/lora/pytorch_lora_weights.safetensors"))


def test_stopped_and_resumed_run_is_bit_identical_with_the_embedding_cache(tmp_path):
    straight = tiny_config(tmp_path, "straight")
    assert straight.model.cache_text_embeddings
    _quiet(straight).train()
    # the same run stopped after 2 iterations, then resumed by a fresh process-like trainer (empty cache)
    _quiet(tiny_config(tmp_path, "stopped", train={"num_iterations": 2})).train()
    resumed = _quiet(tiny_config(tmp_path, "stopped"))
    resumed.train()
    assert resumed.iteration == 4
    a, b = _comparable(read_metrics(tmp_path / "straight")), _comparable(read_metrics(tmp_path / "stopped"))
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b] == [1, 2, 3, 4]
    assert a == b  # exactly: every value of every row
    wa, wb = _final_lora(tmp_path / "straight"), _final_lora(tmp_path / "stopped")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(r["train/optimizer_steps"] > 0 for r in a)


# ---------------------------------------------------------------------------------------------- non-finite
class _NanAfter:
    """Gold-free test reward: noise-level scores, NaN for every image from call ``after`` on."""

    name, differentiable = "nan_after", False

    def __init__(self, after: int):
        self.after, self.calls = after, 0

    def __call__(self, images, prompts, metadata=None):
        self.calls += 1
        scores = images.flatten(1).std(1)
        return (torch.full_like(scores, float("nan")) if self.calls >= self.after else scores), {}


def nan_after(after: int = 3):
    return _NanAfter(after)


def _finite_files(folder: Path) -> bool:
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for f in folder.rglob("*.safetensors") for t in load_file(str(f)).values())


def test_a_reward_returning_nan_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, rewards=[{"name": "test_grpo_guards:nan_after", "args": {"after": 3}}],
                      run={"keep_checkpoints": 5})
    trainer = _quiet(cfg)
    with pytest.raises(TrainingStopped) as err:
        trainer.train()
    message = str(err.value)
    assert "\n" not in message
    assert "stopped at iteration 3" in message and "reward nan_after returned 8 non-finite scores" in message
    assert "checkpoints/iter_000002" in message
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["iter_000001", "iter_000002"]
    assert _finite_files(run / "checkpoints")
    assert [r["iteration"] for r in read_metrics(run)] == [1, 2]


@pytest.mark.parametrize("lr", [1e30, float("inf")])
def test_a_huge_learning_rate_stops_the_run_before_anything_non_finite_is_written(tmp_path, lr):
    trainer = _quiet(tiny_config(tmp_path, train={"ema": False}))
    trainer.cfg.train.lr = lr  # past config validation, as a notebook could
    for group in trainer.optimizer.param_groups:
        group["lr"] = lr
    with pytest.raises(TrainingStopped, match=r"stopped at iteration \d: .*(not finite|gradient norm)") as err:
        trainer.train()
    assert "lower train.lr" in str(err.value)
    run = tmp_path / "run"
    assert not (run / "final").exists()
    assert not (run / "checkpoints").exists() or _finite_files(run / "checkpoints")


def test_save_and_export_refuse_non_finite_weights(tmp_path):
    trainer = _quiet(tiny_config(tmp_path))
    with torch.no_grad():
        trainer.params[0][0, 0] = float("nan")
    with pytest.raises(TrainingStopped, match=r"refusing to write checkpoint iter_000001: .*lora.* is not finite"):
        trainer.state.save(1)
    trainer.state.ema = None
    with pytest.raises(TrainingStopped, match="refusing to export .*final/lora"):
        trainer.state.export(trainer.policy)
    assert not (tmp_path / "run/checkpoints/iter_000001").exists() and not (tmp_path / "run/final").exists()
    assert not list((tmp_path / "run").rglob("*.partial"))


# ---------------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A finished 3-iteration run with a checkpoint after every iteration (copied per test)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    with torch.inference_mode(False):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        _quiet(tiny_config(tmp, train={"num_iterations": 3}, run={"keep_checkpoints": 3})).train()
        torch.set_num_threads(threads)
    return tmp


def _copy_run(src: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(src / "run", tmp_path / "run")
    return tmp_path / "run/checkpoints"


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "trainable.safetensors": _truncate,
    "optimizer.pt": _truncate,
    "rng.pt": _truncate,
    "state.json": lambda p: p.write_text('{"iteration": 3, "files": '),
    "ema.safetensors": lambda p: p.write_bytes(p.read_bytes()[:-1] + b"\x00"),  # same size, other bytes
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, three_checkpoints, name, capsys):
    ckpts = _copy_run(three_checkpoints, tmp_path)
    DAMAGE[name](ckpts / "iter_000003" / name)
    trainer = _quiet(tiny_config(tmp_path, train={"num_iterations": 3}, run={"keep_checkpoints": 3}))
    assert trainer._resume() == 2
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if "damaged" in line)
    assert f"checkpoint {ckpts / 'iter_000003'} is damaged ({name}" in line
    assert f"resuming from {ckpts / 'iter_000002'} instead" in line


def test_resume_past_a_damaged_checkpoint_and_a_killed_write_matches_the_uninterrupted_run(
        tmp_path, three_checkpoints, capsys):
    ckpts = _copy_run(three_checkpoints, tmp_path)
    straight = _final_lora(tmp_path / "run")
    _truncate(ckpts / "iter_000003/trainable.safetensors")
    stale = ckpts / ".iter_000004.partial"  # what a SIGKILL inside a checkpoint write leaves
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"half")
    import shutil

    shutil.rmtree(tmp_path / "run/final")
    trainer = _quiet(tiny_config(tmp_path, train={"num_iterations": 3}, run={"keep_checkpoints": 3}))
    trainer.train()
    assert not stale.exists()
    assert f"removed {stale}" in capsys.readouterr().err
    resumed = _final_lora(tmp_path / "run")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    from flowalign.grpo.state import verify_checkpoint

    assert verify_checkpoint(ckpts / "iter_000003") is None  # rewritten whole


def test_only_damaged_checkpoints_stop_the_resume_with_their_names(tmp_path, three_checkpoints):
    ckpts = _copy_run(three_checkpoints, tmp_path)
    for d in ckpts.iterdir():
        _truncate(d / "rng.pt")
    with pytest.raises(TrainingStopped, match=r"no intact checkpoint in .*iter_000003: rng.pt is \d+ bytes"):
        _quiet(tiny_config(tmp_path, train={"num_iterations": 3}, run={"keep_checkpoints": 3})).train()


def test_resuming_with_another_lora_rank_names_the_key(tmp_path, three_checkpoints):
    _copy_run(three_checkpoints, tmp_path)
    trainer = _quiet(tiny_config(tmp_path, model={"lora_rank": 8}, train={"num_iterations": 4}))
    with pytest.raises(TrainingStopped) as err:
        trainer.train()
    assert "written with model.lora_rank=4, this run has model.lora_rank=8" in str(err.value)
    assert "\n" not in str(err.value)
    # an older checkpoint without recorded settings: the shapes still give the reason, not a RuntimeError
    state = tmp_path / "run/checkpoints/iter_000003/state.json"
    data = json.loads(state.read_text())
    del data["settings"], data["files"]
    state.write_text(json.dumps(data))
    with pytest.raises(TrainingStopped, match=r"of shape \(4, \d+\), this model's is \(8, \d+\).*model.lora_rank"):
        _quiet(tiny_config(tmp_path, model={"lora_rank": 8}, train={"num_iterations": 4})).train()


# ---------------------------------------------------------------------------------------------- judges
@pytest.fixture(scope="module")
def judge_servers():
    """A healthy keyed judge-server and one that answers HTTP 500 to ~40 % of requests."""
    from test_judges_http import KEY_ENV, SECRET, Server

    env = {KEY_ENV: SECRET, "OMP_NUM_THREADS": "1"}
    healthy = Server("--api-key-env", KEY_ENV, env=env)
    flaky = Server("--api-key-env", KEY_ENV, "--error-rate", "0.4", "--seed", "1", env=env)
    yield healthy, flaky
    healthy.close()
    flaky.close()


def _judged(tmp_path, url, key="sk-flowalign-test-0123456789", **train):
    import os

    from test_judges_http import KEY_ENV

    os.environ[KEY_ENV] = key
    judge = {"endpoint": url, "model": "m", "api_key_env": KEY_ENV, "timeout": 5.0, "retries": 0, "concurrency": 4}
    return tiny_config(tmp_path, rewards=[{"name": "win_rate", "args": {"judge": "vlm", "judge_args": judge}}],
                       train={"num_iterations": 2, "ema": False, **train})


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_judge_counts_are_logged_every_iteration(tmp_path, judge_servers, capsys):
    healthy, flaky = judge_servers
    _quiet(_judged(tmp_path, healthy.url)).train()
    rows = read_metrics(tmp_path / "run")
    # 2 groups of 4 images: 2 × 6 pairs per iteration
    assert [(r["judge/requests"], r["judge/failures"], r["judge/ties_from_failures"]) for r in rows] == [(12, 0, 0)] * 2
    assert "judge failed" not in capsys.readouterr().err
    # some failures under the limit: counted, warned about, the run goes on
    cfg = _judged(tmp_path / "flaky", flaky.url, judge_failure_limit=0.9)
    _quiet(cfg).train()
    rows = read_metrics(tmp_path / "flaky/run")
    failures = [r["judge/failures"] for r in rows]
    assert len(rows) == 2 and all(0 < f < 12 for f in failures), failures
    assert [r["judge/ties_from_failures"] for r in rows] == failures
    err = capsys.readouterr().err
    assert f"warning: iteration 1: the judge failed {failures[0]} of 12 requests" in err
    assert (tmp_path / "flaky/run/final/lora").is_dir()


def test_failures_past_the_limit_stop_the_run(tmp_path, judge_servers):
    _, flaky = judge_servers
    with pytest.raises(TrainingStopped, match=r"stopped at iteration 1: the judge failed \d+ of 12 requests .*past "
                                              r"train.judge_failure_limit=0.1"):
        _quiet(_judged(tmp_path, flaky.url, judge_failure_limit=0.1)).train()
    assert not (tmp_path / "run/final").exists()


@pytest.mark.parametrize("fault", ["down", "wrong key"])
def test_a_judge_that_is_down_or_refuses_the_key_stops_the_run(tmp_path, judge_servers, fault, capsys):
    healthy, _ = judge_servers
    url, key = (f"http://127.0.0.1:{_free_port()}/v1", "sk-flowalign-test-0123456789") if fault == "down" \
        else (healthy.url, "sk-wrong")
    # even a limit of 1.0 (any fraction tolerated) stops when every request failed
    with pytest.raises(TrainingStopped) as err:
        _quiet(_judged(tmp_path, url, key=key, judge_failure_limit=1.0)).train()
    message = str(err.value)
    assert message.startswith("stopped at iteration 1: the judge failed 12 of 12 requests (100%)")
    assert "is the judge server up, and its endpoint and API key right?" in message and "\n" not in message
    assert not (tmp_path / "run/final").exists()
    row = read_metrics(tmp_path / "run")[-1]  # the stopped iteration's counts are logged
    assert row["iteration"] == 1 and row["judge/failures"] == row["judge/requests"] == 12
    # with judge_on_failure=warn the run goes on: every comparison a tie, nothing trained, warned every iteration
    _quiet(_judged(tmp_path / "warn", url, key=key, judge_on_failure="warn")).train()
    rows = read_metrics(tmp_path / "warn/run")
    assert [r["judge/failures"] for r in rows] == [12, 12] and [r["train/optimizer_steps"] for r in rows] == [0, 0]
    assert capsys.readouterr().err.count("the judge failed 12 of 12 requests (100%); scored as ties") == 2


def test_judge_counts_sum_the_judges_of_a_multi_reward(judge_servers):
    import os

    from test_judges_http import KEY_ENV, SECRET, _noise_levels

    from flowalign.rewards import build_rewards
    from flowalign.rewards.pairwise import judge_counts

    os.environ[KEY_ENV] = SECRET
    healthy, _ = judge_servers
    client = {"model": "m", "api_key_env": KEY_ENV, "timeout": 5.0, "retries": 0}
    rewards = build_rewards([
        {"name": "vlm_score", "args": {"endpoint": healthy.url, **client}},
        {"name": "vlm_score", "args": {"endpoint": f"http://127.0.0.1:{_free_port()}/v1", **client}},
        {"name": "jpeg_incompressibility"},
    ])
    images = _noise_levels([0.1, 0.5, 0.9])
    _, info = rewards(images, ["p"] * 3, None)
    # pointwise judges fill failures in neutrally: counted as failures, not as ties
    assert judge_counts(info) == {"requests": 6, "failures": 3, "ties_from_failures": 0}
    assert judge_counts(build_rewards([{"name": "jpeg_incompressibility"}])(images, ["p"] * 3, None)[1]) is None
