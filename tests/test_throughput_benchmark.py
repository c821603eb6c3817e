"""benchmarks/throughput.py: the architectures it stores are the real ones (parameter counts, and the
SD3.5-Medium forward FLOPs at 512² counted on the meta device against the published 2.44 TFLOP), and
``--tiny`` runs the whole measurement (rollout with log-probs, bare loop, LoRA training pass, FLOP count,
attention backends) on the CPU in seconds."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput", ROOT / "benchmarks/throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta_transformer(throughput, name: str):
    import diffusers

    spec = throughput.load_architecture(name)
    with torch.device("meta"):
        return spec, getattr(diffusers, spec["transformer"]["_class_name"]).from_config(spec["transformer"])


def test_stored_architectures_have_the_published_sizes(throughput):
    _, sd = _meta_transformer(throughput, "sd35m")
    # SD3.5-Medium: 2.5 B with its 384² positional-embedding table (a buffer of 384·384·1536)
    n_sd = sum(p.numel() for p in sd.parameters()) + sum(b.numel() for b in sd.buffers())
    assert 2.4e9 < n_sd < 2.55e9
    _, flux = _meta_transformer(throughput, "flux_dev")
    assert 11.8e9 < sum(p.numel() for p in flux.parameters()) < 12.0e9  # FLUX.1-dev: 12 B


def test_sd35m_forward_flops_at_512_match_the_published_count(throughput):
    spec, sd = _meta_transformer(throughput, "sd35m")
    with torch.device("meta"):
        inputs = {"hidden_states": torch.randn(1, 16, 64, 64), "timestep": torch.ones(1),
                  "encoder_hidden_states": torch.randn(1, spec["text"]["tokens"], 4096),
                  "pooled_projections": torch.randn(1, spec["text"]["pooled"])}
        tflop = throughput.counted_tflop(lambda: sd(**inputs, return_dict=False))
    assert tflop == pytest.approx(2.44, rel=0.02)


def test_tiny_run_measures_every_part_in_seconds(throughput, tmp_path, capsys):
    out = tmp_path / "tp.json"
    table = tmp_path / "docs/throughput_cpu.md"
    assert throughput.main(["--tiny", "--batch", "3", "--steps", "4", "--repeats", "1", "--json", str(out),
                            "--markdown", str(table)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["peak_tflops"] is None
    sd3, flux = result["rows"]
    assert (sd3["arch"], flux["arch"]) == ("tiny_sd3", "tiny_flux")
    for row in (sd3, flux):
        assert row["mode"] == "eager" and row["size"] == 32 and row["train_batch"] == 2
        assert row["rollout_img_s"] > 0 and row["bare_img_s"] > 0 and 0.3 < row["rollout_overhead"] < 5
        assert row["train_ms_per_image_step"] > 0 and row["mfu"] is None  # no peak known on a CPU
        assert isinstance(row["attention_ms_per_image"]["sdpa"], float)
        assert "xformers" in row["attention_ms_per_image"]
    # the training pass (forward and backward) costs more than a forward: with SD3's two CFG rows, more than two
    assert sd3["train_tflop_per_image_step"] > 2 * sd3["fwd_tflop_per_image"] > 0
    assert flux["train_tflop_per_image_step"] > flux["fwd_tflop_per_image"] > 0
    out = capsys.readouterr().out
    assert "| tiny_sd3 | eager | 32 | 3 (2) |" in out and "| tiny_flux | eager | 32 | 3 (2) |" in out
    assert "| arch | mode |" in table.read_text()


def test_without_a_gpu_the_full_run_says_to_use_tiny(throughput, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert throughput.main([]) == 2
    assert "--tiny" in capsys.readouterr().err
