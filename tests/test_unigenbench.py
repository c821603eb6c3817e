"""UniGenBench end to end: its prompt format, the judge's per-test-point answers from ``flowalign
judge-server`` on loopback (answering from the pocket world's exact evaluator), retries and counted
failures, and ``flowalign eval unigenbench`` on the shipped pocket model."""

import json

import numpy as np
import pytest
from test_judges_http import Server as JudgeServer

from flowalign.eval import unigenbench as U

pytestmark = pytest.mark.usefixtures("one_thread")

TESTPOINTS = {
    "single_object": ["Attribute - Shape"],
    "colors": ["Attribute - Color"],
    "counting": ["Attribute - Quantity"],
    "two_object": ["Relationship - Composition"],
    "position": ["Entity Layout - Two-Dimensional Space"],
    "color_attr": ["Attribute - Color", "Compound - Feature Matching"],
}


def Server(*args: str):
    """``flowalign judge-server`` judging with the pocket gold evaluator (strict: 1 or 0)."""
    return JudgeServer("--reward", "pocket_gold", "--reward-args", json.dumps({"score": "strict"}), *args,
                       env={"OMP_NUM_THREADS": "1"})


def _items(per_category=2):
    from flowalign.pocket.prompts import load_prompt_file

    rows = load_prompt_file("prompts/pocket/test.jsonl")
    items, seen = [], {}
    for r in rows:
        cat = r["category"]
        if seen.get(cat, 0) >= per_category:
            continue
        seen[cat] = seen.get(cat, 0) + 1
        points = TESTPOINTS[cat]
        items.append(U.Item(100 + len(items), r["prompt"], tuple(points), tuple(f"{p} of {r['prompt']}" for p in points)))
    return items


@pytest.fixture(scope="module")
def judged_images(tmp_path_factory):
    """Two images per item: image 0 drawn from the item's own prompt, image 1 from another item's;
    with the pocket evaluator's strict verdict of each."""
    import torch

    from flowalign.eval.runner import save_png
    from flowalign.pocket.evaluate import evaluate
    from flowalign.pocket.render import render_batch

    items = _items()
    folder = tmp_path_factory.mktemp("unigen")
    drawn = [it.prompt for it in items] + [items[(i + 3) % len(items)].prompt for i in range(len(items))]
    arr, _ = render_batch(drawn, seed=1)
    images = torch.from_numpy(arr).float()
    jobs = []
    for i, it in enumerate(items):
        for k, img in ((0, images[i]), (1, images[len(items) + i])):
            path = folder / f"{it.index}_{k}.png"
            save_png(path, img)
            jobs.append((it, path))
    from flowalign.eval.runner import load_pngs

    verdict = evaluate(load_pngs([p for _, p in jobs]), [it.prompt for it, _ in jobs]).strict
    return items, jobs, [bool(v) for v in verdict]


def test_csv_round_trip_and_bad_files(tmp_path):
    items = _items(1)
    path = U.write_items(tmp_path / "bench.csv", items)
    assert U.read_items(path) == items
    (tmp_path / "bad.csv").write_text("index,prompt_en\n1,a cat\n")
    with pytest.raises(ValueError, match=r"missing the column\(s\) \['sub_dims_en'\]"):
        U.read_items(tmp_path / "bad.csv")
    (tmp_path / "bad2.csv").write_text('index,prompt_en,sub_dims_en\n1,a cat,"{""Testpoints"": [""Bogus""], '
                                       '""Testpoint Description"": [""x""]}"\n')
    with pytest.raises(ValueError, match=r"bad2.csv:2: unknown test point"):
        U.read_items(tmp_path / "bad2.csv")


def test_parse_scores():
    assert U.parse_scores("<analysis>['a', 'b']</analysis><score>[1, 0]</score>", 2) == [1, 0]
    assert U.parse_scores("<score>[1, 0]</score>", 3) is None  # wrong length
    assert U.parse_scores("<score>[1, 2]</score>", 2) is None  # not binary
    assert U.parse_scores("I cannot judge this image.", 1) is None
    text = U.judge_text(_items(1)[0])
    assert U.is_request(text) and "「" in text and "Attribute - Shape: Assessment of different shapes" in text


def test_judge_server_answers_every_test_point_from_the_pocket_evaluator(judged_images):
    from flowalign.rewards.vlm import ChatClient

    _, jobs, truth = judged_images
    assert True in truth and False in truth
    server = Server()
    try:
        client = ChatClient(server.url, "pocket-judge", timeout=30, retries=0, concurrency=4)
        judge = U.UniGenBenchJudge(client, parse_retries=0)
        results = judge.evaluate(jobs)
    finally:
        server.close()
    for r, ok in zip(results, truth):
        assert r.scores == [int(ok)] * len(r.item.testpoints) and r.attempts == 1
    summary = U.summarize(results)
    # by hand from the verdicts: every test point of an image carries that image's verdict
    want: dict[str, list[int]] = {}
    for (it, _), ok in zip(jobs, truth):
        for p in it.testpoints:
            want.setdefault(U.primary(p), []).append(int(ok))
    assert summary["primary"] == {k: pytest.approx(np.mean(v)) for k, v in sorted(want.items())}
    assert summary["overall"] == pytest.approx(np.mean([np.mean(v) for v in want.values()]))
    assert summary["failed"] == 0 and summary["images"] == len(jobs) == 24
    assert judge.stats["failed"] == 0 and client.stats["requests"] == 24


def test_faults_are_retried_and_what_is_left_is_counted(judged_images):
    from flowalign.rewards.vlm import ChatClient

    _, jobs, truth = judged_images
    server = Server("--error-rate", "0.25", "--malformed-rate", "0.25", "--seed", "5")
    try:
        client = ChatClient(server.url, "pocket-judge", timeout=30, retries=1, backoff=0.01, concurrency=4)
        judge = U.UniGenBenchJudge(client, parse_retries=1)
        results = judge.evaluate(jobs)
    finally:
        server.close()
    stats = client.stats
    assert stats["http_errors"] > 0 and stats["retries"] > 0 and stats["unparsable"] > 0
    answered = [(r, ok) for r, ok in zip(results, truth) if r.scores is not None]
    assert answered and all(r.scores == [int(ok)] * len(r.item.testpoints) for r, ok in answered)
    assert any(r.attempts == 2 for r, _ in answered)  # a malformed answer was asked again and then judged
    failed = sum(r.scores is None for r in results)
    assert judge.stats["failed"] == failed == U.summarize(results)["failed"]
    assert judge.stats["unparsable"] == stats["unparsable"]
    # every request either answered (parsed or not) or failed after its retries
    assert stats["requests"] == sum(r.attempts for r in results)

    server = Server("--malformed-rate", "1.0")
    try:
        client = ChatClient(server.url, "pocket-judge", timeout=30, retries=0, concurrency=4)
        judge = U.UniGenBenchJudge(client, parse_retries=2)
        results = judge.evaluate(jobs[:4])
    finally:
        server.close()
    assert all(r.scores is None and r.attempts == 3 for r in results)
    assert judge.stats["failed"] == 4 and client.stats["unparsable"] == 12
    assert np.isnan(U.summarize(results)["overall"])


def test_flowalign_eval_unigenbench_on_the_pocket_model(tmp_path):
    from flowalign.cli import main
    from flowalign.eval.runner import load_pngs
    from flowalign.pocket.evaluate import evaluate

    items = _items(1)[:4]
    csv_path = U.write_items(tmp_path / "bench.csv", items)
    server = Server()
    try:
        out = tmp_path / "run"
        code = main(["eval", "unigenbench", "--prompts", str(csv_path), "--out", str(out), "--images-per-prompt", "2",
                     "--device", "cpu", "--steps", "8", "--judge-endpoint", server.url, "--judge-retries", "0",
                     "--no-progress"])
    finally:
        server.close()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    files = sorted((out / "images").glob("*.png"))
    assert len(files) == 8 and report["generated_this_run"] == 8 and report["resolution"] == [32, 32]
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    verdicts = evaluate(load_pngs([r["file"] for r in rows]), [r["prompt"] for r in rows]).strict
    for r, ok in zip(rows, verdicts):
        assert r["scores"] == [int(ok)] * len(r["testpoints"])
    assert report["summary"]["failed"] == 0 and (out / "grid.png").is_file()
