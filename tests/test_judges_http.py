"""The VLM judge client against ``flowalign judge-server`` started here on a free loopback port.

The server's local judge is the JPEG-incompressibility reward: noisier images are "better", so
the expected verdicts and win rates are known exactly.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import re
import subprocess
import sys
import threading

import httpx
import pytest
import torch

from flowalign.rewards import build_judge, build_reward, win_rates

SECRET = "sk-flowalign-test-0123456789"
KEY_ENV = "FLOWALIGN_TEST_JUDGE_KEY"


def _noise_levels(levels, seed=0, size=32) -> torch.Tensor:
    """Gray images with added noise of the given amplitudes: more noise, bigger JPEG."""
    g = torch.Generator().manual_seed(seed)
    out = [(0.5 + a * (torch.rand(3, size, size, generator=g) - 0.5)).clamp(0, 1) for a in levels]
    return torch.stack(out)


class Server:
    def __init__(self, *args: str, env: dict | None = None):
        cmd = [sys.executable, "-m", "flowalign.rewards.server", "--port", "0",
               "--reward", "jpeg_incompressibility", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        line: list[str] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=60)
        m = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line[0] if line else "")
        if not m:
            self.proc.kill()
            raise RuntimeError(f"judge-server did not start: {line} {self.proc.stderr.read()}")
        self.port = int(m.group(1))
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def keyed_server():
    """No faults; requires the API key."""
    s = Server("--api-key-env", KEY_ENV, "--model-name", "pocket-judge", env={KEY_ENV: SECRET})
    yield s
    s.close()


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _judge(url, **kw):
    args = dict(endpoint=url, model="pocket-judge", api_key_env=KEY_ENV, timeout=5.0, retries=0, concurrency=4)
    return build_judge("vlm", **{**args, **kw})


def test_models_endpoint_requires_the_key(keyed_server):
    r = httpx.get(f"{keyed_server.url}/models", headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200 and r.json()["data"][0]["id"] == "pocket-judge"
    assert httpx.get(f"{keyed_server.url}/models").status_code == 401


def test_vlm_judge_verdicts_and_win_rates_over_http(keyed_server, key_env):
    judge = _judge(keyed_server.url)
    flat_noise = _noise_levels([0.0, 1.0])
    p = judge.prefer(["a cat", "a cat"], flat_noise, flat_noise.flip(0))
    assert p.tolist() == [0.0, 1.0]  # (flat, noise): Image 2 better; (noise, flat): Image 1 better

    # Two interleaved groups of 4 with increasing noise: exact rates 0, 1/3, 2/3, 1 in each group.
    amps = [0.1, 0.9, 0.4, 0.2, 0.7, 0.6, 1.0, 0.3]
    ids = ["a", "b"] * 4
    rates, info = win_rates(judge, _noise_levels(amps), ["p " + i for i in ids], group_ids=ids, both_orders=True)
    expected = torch.tensor([0, 3, 1, 0, 2, 2, 3, 1]) / 3
    assert torch.allclose(rates, expected), rates
    assert info["failures"] == 0 and info["comparisons"] == 24
    assert judge.stats["requests"] == 26 and judge.stats["failed"] == 0
    assert SECRET not in repr(judge)


def test_vlm_pointwise_score_over_http(keyed_server, key_env):
    reward = build_reward("vlm_score", endpoint=keyed_server.url, model="pocket-judge", api_key_env=KEY_ENV,
                          timeout=5.0, retries=0, concurrency=4)
    assert reward.name == "vlm_score" and not reward.differentiable
    images = _noise_levels([0.0, 0.5, 1.0])
    scores, info = reward(images, ["x", "y", "x"])
    kb, _ = build_reward("jpeg_incompressibility")(images, ["x", "y", "x"])
    # The server answers with the local reward's score in all three dimensions (6 significant digits).
    assert torch.allclose(scores, kb, rtol=1e-5) and info["failures"] == 0


def test_missing_key_is_a_counted_failure_and_the_key_is_never_logged(keyed_server, monkeypatch, caplog):
    monkeypatch.setenv("FLOWALIGN_OTHER_KEY", "wrong-" + SECRET)
    judge = _judge(keyed_server.url, api_key_env="FLOWALIGN_OTHER_KEY")
    with caplog.at_level(logging.DEBUG, logger="flowalign"):
        rates, info = win_rates(judge, _noise_levels([0.1, 0.5, 0.9]), ["p"] * 3)
    assert torch.allclose(rates, torch.full((3,), 0.5))  # every comparison failed -> ties
    assert info["failures"] == 3 and judge.stats["http_errors"] == 3
    assert "401" in caplog.text
    assert SECRET not in caplog.text and SECRET not in repr(judge)


def _expected_faults(seed: int, n: int, rates=(0.1, 0.1, 0.1)) -> dict[str, int]:
    """The server's fault draws: one uniform per request from random.Random(seed)."""
    rng, counts = random.Random(seed), {"error": 0, "malformed": 0, "timeout": 0}
    for _ in range(n):
        u = rng.random()
        for kind, edge in zip(counts, (rates[0], rates[0] + rates[1], sum(rates))):
            if u < edge:
                counts[kind] += 1
                break
    return counts


def test_injected_faults_become_counted_ties():
    seed = 3
    expected = _expected_faults(seed, 24)
    assert min(expected.values()) >= 1 and sum(expected.values()) >= 5  # the seed exercises every fault
    server = Server("--error-rate", "0.1", "--malformed-rate", "0.1", "--timeout-rate", "0.1",
                    "--timeout-sleep", "15", "--seed", str(seed))
    try:
        # a clean answer must come well inside the client's timeout even on a loaded machine (1 s was not
        # always: a slow clean answer counted as a timeout), an injected one well outside it
        judge = build_judge("vlm", endpoint=server.url, model="m", timeout=5.0, retries=0, concurrency=8)
        amps = [0.1, 0.9, 0.4, 0.2, 0.7, 0.6, 1.0, 0.3]
        ids = [0, 1] * 4
        rates, info = win_rates(judge, _noise_levels(amps), ["p"] * 8, group_ids=ids, both_orders=True)
    finally:
        server.close()
    # 24 requests, one fault draw each: the counts are fixed by the seed whatever the thread order.
    assert info["comparisons"] == 24
    assert info["failures"] == sum(expected.values())
    stats = judge.stats
    assert stats["timeouts"] == expected["timeout"]
    assert stats["http_errors"] == expected["error"]
    assert stats["unparsable"] == expected["malformed"]
    assert rates.shape == (8,) and ((rates >= 0) & (rates <= 1)).all()
    for g in (0, 1):  # every comparison hands out exactly 1 point: a group of 4 shares 2 per order
        assert torch.isclose(rates[g::2].sum(), torch.tensor(2.0))
    # The clean comparisons still rank: the noisiest image of each group beats the cleanest one.
    assert rates[6] > rates[0] and rates[1] > rates[7]


def test_retries_recover_from_server_errors():
    server = Server("--error-rate", "0.3", "--seed", "1")
    try:
        judge = build_judge("vlm", endpoint=server.url, model="m", timeout=5.0, retries=3, backoff=0.01,
                            concurrency=8)
        amps = [0.1, 0.9, 0.4, 0.2]
        rates, info = win_rates(judge, _noise_levels(amps), ["p"] * 4, both_orders=True)
    finally:
        server.close()
    stats = judge.stats
    assert stats["retries"] > 0  # the seed's first draws include errors
    assert info["failures"] == stats["failed"] < stats["http_errors"]  # most errors were retried away
    if info["failures"] == 0:
        assert torch.allclose(rates, torch.tensor([0, 3, 2, 1]) / 3)


def test_unreachable_server_never_raises():
    judge = build_judge("vlm", endpoint="http://127.0.0.1:9/v1", model="m", timeout=0.5, retries=1,
                        backoff=0.01)
    rates, info = win_rates(judge, _noise_levels([0.1, 0.5, 0.9]), ["p"] * 3)
    assert torch.allclose(rates, torch.full((3,), 0.5))
    assert info["failures"] == 3 and judge.stats["connection_errors"] == 6


def test_cli_registers_judge_server():
    from flowalign.rewards.cli import register

    parser = argparse.ArgumentParser(prog="flowalign")
    register(parser.add_subparsers(dest="command"))
    ns = parser.parse_args(["judge-server", "--port", "0", "--error-rate", "0.2", "--reward", "jpeg_compressibility"])
    assert ns.port == 0 and ns.error_rate == 0.2 and ns.reward == "jpeg_compressibility" and callable(ns.func)
