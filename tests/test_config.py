import pytest

from flowalign.config import Config, ConfigError, describe, load_config, save_config


def write(tmp_path, text, name="c.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_valid_yaml_and_overrides(tmp_path):
    p = write(tmp_path, "train:\n  lr: 1.0e-5\n  group_size: 8\nsampling:\n  num_steps: 16\n")
    cfg = load_config(p, ["train.lr=2e-4", "sampling.noise_level=0.8", "rewards=[{name: clip, weight: 0.5}]"])
    assert isinstance(cfg, Config)
    assert cfg.train.lr == 2e-4 and cfg.train.group_size == 8 and cfg.sampling.num_steps == 16
    assert cfg.sampling.noise_level == 0.8
    assert cfg.rewards[0].name == "clip" and cfg.rewards[0].weight == 0.5 and cfg.rewards[0].args == {}


def test_shipped_configs_load():
    import pathlib

    # configs/reno holds noise-optimization configs (their own schema, tested in test_noise_opt_cli), configs/accelerate
    # accelerate launch files (tested in test_accelerate_launch_files)
    files = sorted(f for f in pathlib.Path(__file__).parents[1].glob("configs/**/*.yaml")
                   if f.parent.name not in ("reno", "accelerate"))
    assert files
    for f in files:
        load_config(f)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; did you mean 'train.lr'?"),
        (["trian.lr=1"], "unknown config key 'trian'; did you mean 'train'?"),
        (["rewards=[{nme: clip}]"], "unknown config key 'rewards[0].nme'; did you mean 'rewards[0].name'?"),
        (["train.lr=abc"], "config key 'train.lr': Value 'abc' of type 'str' could not be converted to Float"),
        (["train.group_size=2.5"], "config key 'train.group_size'"),
        (["sampling.sde_kind=flowgrpo"], "did you mean 'flow_grpo'? (choose one of: flow_grpo, dance, cps)"),
        (["sampling.noise_level=-1"], "config key 'sampling.noise_level' must be >= 0, got -1.0"),
        (["train.lr=0"], "config key 'train.lr' must be > 0"),
        (["train.timestep_fraction=1.5"], "config key 'train.timestep_fraction' must be <= 1"),
        (["sampling.sde_kind=cps"], "set sampling.include_last_step=false"),
        (["sampling.plan=window", "sampling.window_size=20"], "sampling.window_size=20 exceeds sampling.num_steps=10"),
        (["sampling.plan=window", "sampling.window_start=9", "sampling.window_size=2"], "use window_start <= 8"),
        (["sampling.plan=branching", "sampling.branch_steps=[5,2]"], "must be sorted, unique step indices in [0, 9]"),
        (["sampling.plan=random_window", "sampling.window_range=[4,2]"], "sampling.window_range=[4, 2]"),
        (["model.family=sd_turbo"], "GRPO needs a flow model"),
        (["rewards=[]"], "rewards is empty"),
        (["rewards=[{weight: 1}]"], "config key 'rewards[0].name' is required; set it in the YAML file"),
        (["noequals"], "override 'noequals' is not of the form key=value"),
        (["train.micro_batch_size=1000"], "train.micro_batch_size=1000 is larger than the images per iteration"),
    ],
)
def test_bad_input_messages(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(write(tmp_path, "train: 3\n"))


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=5e-5", "sampling.plan=window", "sampling.window_size=3"])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    assert load_config(out) == cfg
    assert not list(out.parent.glob("*.tmp*"))


def test_every_field_has_help():
    rows = describe()
    assert len(rows) > 40
    missing = [k for k, _, h in rows if not h.strip()]
    assert not missing
