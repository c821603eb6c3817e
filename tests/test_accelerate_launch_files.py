"""The shipped accelerate launch files (configs/accelerate/) as accelerate itself reads them: its config
loader, and the argument merge ``accelerate launch --config_file`` runs before starting processes.
(``test_grpo_fsdp.py`` launches training with ``fsdp_full_ft.yaml``.)"""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ROOT / "configs/accelerate"


def _cluster(name: str):
    from accelerate.commands.config.config_args import load_config_from_file

    return load_config_from_file(str(FILES / name))


def _launch_args(name: str, *extra: str):
    """The arguments ``accelerate launch --config_file <name> <extra> train.py`` starts processes with."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", str(FILES / name), *extra, "train.py"])
    args, _, _ = _validate_launch_command(args)
    return args


def test_every_launch_file_is_listed_and_loads():
    assert sorted(p.name for p in FILES.glob("*.yaml")) == ["ddp_8gpu.yaml", "fsdp_full_ft.yaml",
                                                            "multinode_4x8.yaml"]


def test_single_node_ddp_runs_8_processes_on_one_machine():
    c = _cluster("ddp_8gpu.yaml")
    assert (c.distributed_type.value, c.num_processes, c.num_machines) == ("MULTI_GPU", 8, 1)
    assert str(c.mixed_precision) == "bf16" and not c.use_cpu
    args = _launch_args("ddp_8gpu.yaml")
    assert args.multi_gpu and not args.use_fsdp and args.num_processes == 8 and args.num_machines == 1


def test_fsdp_file_selects_fsdp2_with_the_sd3_blocks_as_units():
    c = _cluster("fsdp_full_ft.yaml")
    assert (c.distributed_type.value, c.num_processes, c.num_machines) == ("FSDP", 8, 1)
    f = c.fsdp_config
    assert f["fsdp_version"] == 2  # the trainer refuses FSDP1
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    from diffusers.models.transformers.transformer_sd3 import JointTransformerBlock

    assert f["fsdp_transformer_layer_cls_to_wrap"] == JointTransformerBlock.__name__
    assert f["fsdp_state_dict_type"] == "SHARDED_STATE_DICT" and f["fsdp_reshard_after_forward"] is True
    args = _launch_args("fsdp_full_ft.yaml")
    assert args.use_fsdp and str(args.fsdp_version) == "2" and args.num_processes == 8


def test_multinode_file_counts_all_32_processes_over_4_machines():
    c = _cluster("multinode_4x8.yaml")
    assert (c.distributed_type.value, c.num_processes, c.num_machines) == ("MULTI_GPU", 32, 4)
    assert c.main_process_ip and c.main_process_port == 29500 and c.rdzv_backend == "static"
    args = _launch_args("multinode_4x8.yaml", "--machine_rank", "3", "--main_process_ip", "192.168.1.7")
    assert (args.num_processes, args.num_machines, args.machine_rank) == (32, 4, 3)
    assert args.main_process_ip == "192.168.1.7"  # the command line overrides the example address
    assert args.num_processes // args.num_machines == 8


@pytest.mark.parametrize("name", ["ddp_8gpu.yaml", "fsdp_full_ft.yaml", "multinode_4x8.yaml"])
def test_the_commands_in_the_files_name_recipes_that_exist(name):
    text = (FILES / name).read_text()
    recipes = {w for w in text.split() if w.startswith("configs/") and w.endswith(".yaml")}
    assert recipes and all((ROOT / r).is_file() for r in recipes), recipes


def test_the_ddp_launch_file_runs_flowalign_train(tmp_path):
    """The README's command with the single-node file, on 2 CPU processes (``--num_processes`` overrides the
    file's 8; without GPUs accelerate runs them on gloo): the run splits its images over both and exports."""
    import sys

    import yaml
    from _launch import run_launched
    from test_grpo_distributed import ddp_config

    cfg = ddp_config(tmp_path, num_iterations=1)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FILES / "ddp_8gpu.yaml"),
           "--num_processes", "2", "-m", "flowalign", "train", str(path)]
    res = run_launched(cmd, cwd=ROOT, timeout=300)
    assert "processes=2" in res.stdout and "units_per_process=8" in res.stdout
    assert (tmp_path / "run/final/lora/pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("processes, gpus, device, refused", [
    (8, 8, "auto", False), (8, 4, "auto", True), (8, 4, "cuda", True), (2, 0, "auto", False), (2, 0, "cpu", False),
    (1, 0, "cuda", False),  # (a missing GPU is model.device's own error)
])
def test_a_launch_with_more_processes_per_machine_than_gpus_is_refused(processes, gpus, device, refused):
    from flowalign.errors import UserError
    from flowalign.grpo.trainer import check_launch

    if not refused:
        check_launch(processes, gpus, device)
        return
    with pytest.raises(UserError, match=f"{processes} processes were launched on this machine, which has {gpus} GPU"):
        check_launch(processes, gpus, device)

