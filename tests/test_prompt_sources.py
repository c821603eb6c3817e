"""Prompt sources (flowalign.prompts.read_prompts): local .txt/.jsonl/.csv/.parquet, folders saved by
datasets' save_to_disk, Hub-style datasets (``hf:``) from local data folders, and one clear error for each
bad source (missing column, unknown split, a dataset neither cached nor reachable)."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from flowalign.prompts import parse_source, read_prompts  # noqa: E402


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Hub lookups fail at once (no network retries): a Hub source here is local or must not be fetched."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


ROWS = [{"caption": "a red cube", "tag": "color"}, {"caption": "two blue balls", "tag": "count"},
        {"caption": "a red cube", "tag": "color"}]


def test_text_and_jsonl_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# comment\na cat\n\n  a dog  \n")
    assert read_prompts(txt) == [{"prompt": "a cat"}, {"prompt": "a dog"}]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"prompt": "a cat", "tag": "x"}) + "\n" + json.dumps({"prompt": "a cat"}) + "\n")
    assert read_prompts(jl) == [{"prompt": "a cat", "tag": "x"}, {"prompt": "a cat"}]
    assert read_prompts(f"{jl}?unique=true") == [{"prompt": "a cat", "tag": "x"}]


def test_csv_and_parquet_tables_keep_other_columns_as_metadata(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("caption,tag\na red cube,color\ntwo blue balls,count\n")
    rows = read_prompts(f"{csv_path}?column=caption")
    assert rows == [{"tag": "color", "prompt": "a red cube"}, {"tag": "count", "prompt": "two blue balls"}]
    pq = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(pq))
    rows = read_prompts(f"{pq}?column=caption&unique=1")
    assert [r["prompt"] for r in rows] == ["a red cube", "two blue balls"]
    assert rows[1]["tag"] == "count"


def test_saved_dataset_folders(tmp_path):
    one = tmp_path / "one"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(one))
    assert [r["prompt"] for r in read_prompts(f"{one}?column=caption")] == ["a red cube", "two blue balls",
                                                                           "a red cube"]
    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:2]),
                          "test": datasets.Dataset.from_list(ROWS[2:])}).save_to_disk(str(dd))
    assert [r["prompt"] for r in read_prompts(f"{dd}?split=test&column=caption")] == ["a red cube"]
    with pytest.raises(ValueError, match=r"holds the splits train, test; pick one with \?split=NAME"):
        read_prompts(f"{dd}?column=caption")


def test_hub_source_from_a_local_data_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(data / "train.parquet"))
    datasets.Dataset.from_list([{"caption": "held out", "tag": "x"}]).to_parquet(str(data / "test.parquet"))
    rows = read_prompts(f"hf:{data}?split=test&column=caption")
    assert rows == [{"tag": "x", "prompt": "held out"}]
    rows = read_prompts(f"hf:{data}?split=train[:2]&column=caption")  # datasets' split slicing
    assert [r["prompt"] for r in rows] == ["a red cube", "two blue balls"]
    # a text file inside the dataset repository: its lines are the 'text' column
    (tmp_path / "repo" / "train").mkdir(parents=True)
    (tmp_path / "repo" / "train" / "prompts.txt").write_text("a cat\na dog\n")
    rows = read_prompts(f"hf:{tmp_path / 'repo'}?data_files=train/prompts.txt&column=text")
    assert [r["prompt"] for r in rows] == ["a cat", "a dog"]


def test_bad_sources_give_one_clear_error_each(tmp_path, monkeypatch):
    pq = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(pq))
    with pytest.raises(ValueError, match=r"has no column 'prompt' \(its columns: caption, tag\); name the prompt "
                                         r"column with \?column=NAME"):
        read_prompts(pq)
    data = tmp_path / "data"
    data.mkdir()
    datasets.Dataset.from_list(ROWS).to_parquet(str(data / "train.parquet"))
    with pytest.raises(ValueError, match="has no column 'text'"):
        read_prompts(f"hf:{data}?column=text")
    with pytest.raises(ValueError, match=r"fix \?split="):
        read_prompts(f"hf:{data}?split=validation&column=caption")
    with pytest.raises(ValueError, match="unknown option 'colum'"):
        parse_source("hf:a/b?colum=x")
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="option 'data_files' is for Hub datasets"):
        parse_source(f"{pq}?data_files=x")


def test_unreachable_dataset_id_says_where_the_data_comes_from(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "empty-cache")
    with pytest.raises(ValueError) as e:
        read_prompts("hf:flowalign-tests/no-such-dataset?split=test&column=caption")
    msg = str(e.value)
    assert "'flowalign-tests/no-such-dataset' is not in the local cache" in msg
    assert "offline mode is on" in msg
    assert "datasets.load_dataset('flowalign-tests/no-such-dataset', split='test')" in msg


def test_bad_prompt_sources_stop_flowalign_train_before_anything_loads(tmp_path, capsys):
    from pathlib import Path

    from flowalign.cli import main

    recipe = Path(__file__).resolve().parents[1] / "configs/pocket/flow_grpo.yaml"
    pq = tmp_path / "p.parquet"
    datasets.Dataset.from_list(ROWS).to_parquet(str(pq))
    for source, message in ((f"{pq}?column=text", "has no column 'text' (its columns: caption, tag)"),
                            ("hf:flowalign-tests/no-such-dataset?column=caption", "is not in the local cache")):
        rc = main(["train", str(recipe), f"train.prompts={source}", f"run.output_dir={tmp_path / 'run'}", "--dry-run"])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
        assert len([line for line in err.splitlines() if line.startswith("flowalign")]) == 1
        assert not (tmp_path / "run").exists()  # nothing loaded, nothing written


def test_a_recipes_local_source_with_options_is_found_from_any_folder(tmp_path, monkeypatch):
    from flowalign.config import load_config

    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "p.csv").write_text("caption\na red cube\n")
    (tmp_path / "configs").mkdir()
    cfg_file = tmp_path / "configs" / "x.yaml"
    cfg_file.write_text("model: {family: sd3}\ntrain: {prompts: 'prompts/p.csv?column=caption'}\n"
                        "eval: {prompts: 'hf:owner/name?split=test'}\n")
    monkeypatch.chdir(tmp_path / "configs")  # prompts/ is not below the current folder
    cfg = load_config(cfg_file)
    assert cfg.train.prompts == f"{tmp_path / 'prompts' / 'p.csv'}?column=caption"
    assert cfg.eval.prompts == "hf:owner/name?split=test"  # a Hub source is left as written
    assert read_prompts(cfg.train.prompts) == [{"prompt": "a red cube"}]


def test_a_dataset_the_hub_does_not_have_is_named(monkeypatch):
    # what datasets raises when the Hub answers that no such dataset exists (not reachable offline here)
    def not_found(path, **kwargs):
        raise datasets.exceptions.DatasetNotFoundError(f"Dataset '{path}' doesn't exist on the Hub or cannot be accessed.")

    monkeypatch.setattr(datasets, "load_dataset", not_found)
    from flowalign.errors import UserError

    with pytest.raises(UserError, match=r"the Hub has no dataset 'owner/nmae' that this machine may read .*check the id "
                                         r"\(https://huggingface.co/datasets/owner/nmae\)"):
        read_prompts("hf:owner/nmae?column=caption")
