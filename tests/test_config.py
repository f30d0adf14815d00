"""Settings are checked where they are made: the error names the field, the value and what is allowed."""
import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from torchrun_train import parse_overrides

BAD = [  # (override, words the error must hold)
    (dict(batch_size=0), "batch_size=0: must be > 0"),
    (dict(out_dim=1), r"out_dim=1: must be >= 2 \(a softmax over one prototype is 1 whatever the image\)"),
    (dict(patch_size=0), "patch_size=0: must be > 0"),
    (dict(img_size=60), "img_size=60: must be a multiple of patch_size=8"),
    (dict(global_crop_size=60), "global_crop_size=60: must be a multiple of patch_size=8"),
    (dict(local_crop_size=36), "local_crop_size=36: must be a multiple of patch_size=8"),
    (dict(local_crop_scale=(1.5, 2)), r"local_crop_scale=\(1.5, 2\): must be in \(0, 1\]"),
    (dict(global_crop_scale=(1.0, 0.4)), r"global_crop_scale=\(1.0, 0.4\): must be \(low, high\)"),
    (dict(crop_ratio=(1.0,)), "crop_ratio.*tuple of 2 numbers"),
    (dict(momentum_teacher=5), r"momentum_teacher=5: must be in \[0, 1\]"),
    (dict(drop_path_rate=1.5), r"drop_path_rate=1.5: must be in \[0, 1\)"),
    (dict(base_lr=-1e-3), "base_lr=-0.001: must be > 0"),
    (dict(min_lr=float("nan")), "min_lr=nan: must be a finite float"),
    (dict(n_local_crops=-1), "n_local_crops=-1: must be >= 0"),
    (dict(batch_size="64"), "batch_size='64': must be a finite int, not a str"),
    (dict(batch_size=True), "batch_size=True: must be a finite int, not a bool"),
    (dict(epochs=2.0), "epochs=2.0: must be a finite int, not a float"),
    (dict(amp=1), "amp=1: must be a bool, not an int"),
    (dict(run_name=2024), r"run_name=2024: must be a str, not an int \(YAML reads 2024 as a number: write it in quotes, .2024.\)"),
    (dict(val_fraction=0.0), r"val_fraction=0.0: must be in \(0, 1\)"),
    (dict(val_fraction=1), r"val_fraction=1: must be in \(0, 1\)"),
    (dict(arch="vit_huge"), "arch='vit_huge': must be one of"),
    (dict(device="gpu"), "device='gpu'"),
    (dict(run_name="../elsewhere"), "run_name='../elsewhere': must be a plain name"),
    (dict(run_name="/tmp/x"), "run_name='/tmp/x': must be a plain name"),
    (dict(run_name="a/b"), "run_name='a/b': must be a plain name"),
    (dict(run_name=""), "run_name='': must be a plain name"),
    (dict(run_name=".."), "run_name='..': must be a plain name"),
    (dict(seed=2**40), r"seed=1099511627776: must be in \[0, 2\*\*31\)"),
    (dict(seed=-1), r"seed=-1: must be in \[0, 2\*\*31\)"),
    (dict(base_lr="2e-3"), r"base_lr='2e-3': must be a finite float, not a str \(write 0.002: YAML reads 2e-3"),
    (dict(warmup_epochs=4), "warmup_epochs=4: must be at most epochs=3, or the learning rate never reaches its peak"),
    (dict(warmup_teacher_temp_epochs=4), "warmup_teacher_temp_epochs=4: must be at most epochs=3, or the teacher"),
    (dict(koleo_weight=0.1, batch_size=1), r"batch_size=1: must be at least 2 with koleo_weight=0.1: KoLeo spreads"),
    (dict(min_lr=1e-3), r"min_lr=0.001: must be at most the peak learning rate \(of one process\) base_lr \* batch_size / 256 = 0.00025"),
    (dict(base_lr=1e-5), r"min_lr=1e-06: must be at most the peak learning rate .* = 6.25e-07: the cosine"),
    (dict(max_eval_images=1), r"max_eval_images=1: must be 0 \(all\) or at least 2: the linear probe standardises"),
]


@pytest.mark.parametrize("override,message", BAD, ids=[next(iter(o)) + "=" + repr(next(iter(o.values())))
                                                       for o, _ in BAD])
def test_bad_settings_fail_where_they_are_made(nb, override, message):
    with pytest.raises(nb.ConfigError, match=message):
        nb.make_config("demo", **override)
    with pytest.raises(nb.ConfigError, match=message):
        dataclasses.replace(nb.make_config("demo"), **override)


def test_crops_larger_than_the_stored_images_are_refused_where_settings_are_given(nb):
    """paper224 with img_size 112 kept its 224-pixel crops: every crop enlarged 2x from fewer pixels at a full
    crop's cost, without a word. Refused where settings are given (make_config: the notebook's parameters,
    torchrun's --set); a config read back from an older run's checkpoint still loads."""
    with pytest.raises(nb.ConfigError, match=r"global_crop_size=224: must be at most img_size=112: crops are cut "
                                             r"from the images stored at img_size"):
        nb.make_config("paper224", img_size=112)
    assert nb.make_config("paper224", img_size=112, global_crop_size=112, local_crop_size=48).img_size == 112
    old_run = dataclasses.replace(nb.make_config("demo"), img_size=32)   # as a run made before the rule
    assert nb.claimed_config({"config": dataclasses.asdict(old_run)}, "last.pth").global_crop_size == 64


def test_every_profile_is_valid_and_good_values_pass(nb):
    for profile in nb.PROFILES:
        nb.make_config(profile)
    cfg = nb.make_config("demo", local_crop_scale=[0.1, 0.3], base_lr=1, val_fraction=0.5, run_name="run-2.b_c")
    assert cfg.local_crop_scale == (0.1, 0.3) and cfg.base_lr == 1
    assert set(nb.CONFIG_ARCHS) == set(nb.VIT_ARCHS)   # the check knows every architecture the ViT section builds


def test_the_yaml_hint_is_for_strings_only(nb):
    for value, said in [(float("nan"), "not a float"), (True, "not a bool"), ("2e-3", "YAML reads 2e-3 as a string)"),
                        ("inf", "not a str"), ("nan", "not a str")]:   # no hint to write a number it refuses
        with pytest.raises(nb.ConfigError) as error:
            nb.make_config("demo", base_lr=value)
        assert str(error.value).endswith(said), str(error.value)


@pytest.mark.parametrize("text", ["1e-06", "5e-4", "2e-3", "1e+20", "0.5", "3"])
def test_the_yaml_hint_writes_a_number_yaml_reads_as_one(nb, text):
    """The hint said `write 1e-06` for min_lr: 1e-06 (papermill's YAML reads that as a string too)."""
    with pytest.raises(nb.ConfigError, match=r"\(write (\S+): YAML reads") as error:
        nb.config_from_parameters("demo", {"min_lr": text})
    written = re.search(r"\(write (\S+): YAML", str(error.value)).group(1)
    assert yaml.safe_load(f"min_lr: {written}") == {"min_lr": float(text)}


def test_the_notebook_parameters_must_be_a_mapping(nb):
    """papermill's -p overrides "{epochs: 1}" passes a string: the error says how to pass the mapping."""
    assert nb.config_from_parameters("demo", {"epochs": 1}).epochs == 1
    with pytest.raises(nb.ConfigError, match=r"overrides='\{epochs: 1\}': must be a mapping .* -y \"overrides: "):
        nb.config_from_parameters("demo", "{epochs: 1}")


def test_assignment_is_checked_and_leaves_the_config_as_it_was(nb):
    cfg = nb.make_config("demo")
    with pytest.raises(nb.ConfigError, match="batch_size=0"):
        cfg.batch_size = 0
    with pytest.raises(nb.ConfigError, match="img_size=64: must be a multiple of patch_size=7"):
        cfg.patch_size = 7
    assert cfg.batch_size == 16 and cfg.patch_size == 8 and cfg == nb.make_config("demo")
    cfg.compile = not cfg.compile
    assert cfg.compile is not nb.make_config("demo").compile


def test_a_misspelt_field_assigned_offers_the_closest_names(nb):
    """cfg.epoch = 3 raised dataclasses' "__init__() got an unexpected keyword argument 'epoch'"."""
    cfg = nb.make_config("demo")
    with pytest.raises(nb.ConfigError, match=r"unknown Config field\(s\): 'epoch' \(did you mean 'epochs'"):
        cfg.epoch = 3
    assert cfg == nb.make_config("demo") and not hasattr(cfg, "epoch")


def test_a_run_name_whose_both_folders_hold_other_runs_is_a_config_error(nb, tmp_path):
    """Raised as a bare ValueError: papermill showed a traceback through the notebook for a setting."""
    make = lambda **kw: nb.make_config("demo", checkpoint_dir=str(tmp_path), **kw)
    nb.record_settings(make(), nb.run_directory(make()))
    other = nb.run_directory(make(epochs=2))   # checkpoints/demo-<hash of these settings>
    other.mkdir()
    nb.record_settings(make(epochs=3), other)   # another run's settings there (a copied folder)
    with pytest.raises(nb.ConfigError, match=f"{other.name}: holds a run of other settings too"):
        nb.run_directory(make(epochs=2))


def test_command_line_overrides_are_checked(nb):
    with pytest.raises(nb.ConfigError, match="batch_size='many': must be a finite int"):
        nb.make_config("demo", **parse_overrides(["batch_size=many"]))
    with pytest.raises(nb.ConfigError, match="must be a plain name"):
        nb.make_config("demo", **parse_overrides(["run_name=../../etc"]))
    script = Path(__file__).resolve().parent / "torchrun_train.py"
    done = subprocess.run([sys.executable, str(script), "--profile", "demo", "--set", "patch_size=0"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "Config.patch_size=0: must be > 0" in done.stderr


def test_figure_names_stay_in_the_figure_folder(nb, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cfg = nb.make_config("demo", figure_dir=str(tmp_path / "figures"))
    fig = plt.figure(figsize=(1, 1))
    for name in ("../outside", "/tmp/abs", "", "a/b"):
        with pytest.raises(nb.ConfigError, match="figure name"):
            nb.save_figure(fig, cfg, name)
    assert nb.save_figure(fig, cfg, "fine_name") == tmp_path / "figures" / "demo" / "fine_name.jpg"
    assert nb.save_figure(fig, cfg, "line_art", photo=False) == tmp_path / "figures" / "demo" / "line_art.png"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["demo", "figures", "fine_name.jpg", "line_art.png"]
    plt.close(fig)


@pytest.mark.parametrize("name, close", [("lr", "'base_lr' or 'min_lr' or 'probe_lr'"), ("epoch_count", "'epochs'"),
                                         ("datadir", "'data_root'"), ("init", "'init_from'")])
def test_an_unknown_field_offers_the_closest_names(nb, name, close):
    with pytest.raises(nb.ConfigError, match=f"unknown Config field.*'{name}' \\(did you mean {close}"):
        nb.make_config("demo", **{name: 1})


def test_architecture_table_is_what_the_vit_section_builds(nb):
    import torch
    assert set(nb.ARCH_SHAPES) == set(nb.CONFIG_ARCHS) == set(nb.VIT_ARCHS)
    with torch.device("meta"):
        for arch, shape in nb.ARCH_SHAPES.items():
            model = nb.VIT_ARCHS[arch]()
            assert (model.embed_dim, len(model.blocks), model.num_heads) == tuple(shape.values())
            assert nb.HEADS_BY_WIDTH[model.embed_dim] == model.num_heads


def test_own_images_and_evaluate_file_are_checked_when_given(nb, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "pics").mkdir()
    (tmp_path / "dog.jpg").write_bytes(b"")
    cfg = nb.make_config("demo", own_images="~/pics")
    assert cfg.own_images == (str(tmp_path / "pics"),)
    assert nb.make_config("demo", own_images=["~/dog.jpg", "~/pics"]).own_images == \
        (str(tmp_path / "dog.jpg"), str(tmp_path / "pics"))
    with pytest.raises(nb.ConfigError, match=f"own_images='{tmp_path}/cat.jpg': no such file or folder"):
        nb.make_config("demo", own_images=["~/dog.jpg", "~/cat.jpg"])
    with pytest.raises(nb.ConfigError, match="own_images=.*must be a list of image files or folders"):
        nb.make_config("demo", own_images=[3])
    with pytest.raises(nb.ConfigError, match="evaluate_file=.*dog.jpg': not a checkpoint"):
        nb.make_config("demo", evaluate_file="~/dog.jpg")
    import torch
    torch.save(nb.vit_tiny(patch_size=8, img_size=224).state_dict(), tmp_path / "tiny224.pth")
    with pytest.raises(nb.ConfigError, match="a 28x28 position grid in the file vs 8x8 for img_size=64"):
        nb.make_config("demo", demo_checkpoint=str(tmp_path / "tiny224.pth"))   # loaded as is: the grid must fit
    assert nb.make_config("demo", init_from=str(tmp_path / "tiny224.pth")).init_from   # resized: fine
    # evaluate_file: a release at 224 px, read into its own ViT and evaluated at 64 px (it was refused)
    cfg = nb.make_config("demo", evaluate_file=str(tmp_path / "tiny224.pth"), checkpoint_dir=str(tmp_path / "ck"))
    backbone, _ = nb.trained_teacher(cfg, torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert backbone.pos_embed.shape[1] == 1 + 28 * 28 and nb.extract_features(backbone, images).shape == (2, 192)


def test_errors_of_settings_data_and_checkpoints_show_as_their_message_alone(nb):
    for error in (nb.ConfigError("Config.x=1: must be > 1"), nb.DataError("f: bad"), nb.CheckpointError("c: bad")):
        assert error._render_traceback_() == [f"{type(error).__name__}: {error}"]   # IPython's (papermill's) view


def test_a_device_this_machine_lacks_is_refused_where_it_is_picked(nb, monkeypatch):
    monkeypatch.setattr(nb.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(nb.torch.backends.mps, "is_available", lambda: False)
    assert nb.pick_device("auto") == nb.torch.device("cpu")
    with pytest.raises(nb.ConfigError, match=r"device='cuda', but torch .* sees 0 CUDA GPU\(s\) here; set device: auto"):
        nb.pick_device("cuda")
    with pytest.raises(nb.ConfigError, match=r"device='mps', but MPS .* is not available"):
        nb.pick_device("mps")
    monkeypatch.setattr(nb.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(nb.torch.cuda, "device_count", lambda: 2)
    assert nb.pick_device("auto") == nb.pick_device("cuda") == nb.torch.device("cuda")
    assert nb.pick_device("cuda:1") == nb.torch.device("cuda", 1)
    with pytest.raises(nb.ConfigError, match=r"device='cuda:2', but torch .* sees 2 CUDA GPU\(s\)"):
        nb.pick_device("cuda:2")


def test_the_folders_a_run_writes_to_expand_their_tilde(nb):
    """`~/dino_runs` made a folder named '~' under the notebook's folder: expanded as data_root is, however the
    setting is given (it was expanded by make_config only, not by `cfg.x = ...` or dataclasses.replace)."""
    given = dict(checkpoint_dir="~/dino_runs", cache_dir="~/c", figure_dir="~/f", embedded_dir="~/e")
    home = os.path.expanduser("~")
    expanded = [f"{home}/dino_runs", f"{home}/c", f"{home}/f", f"{home}/e"]
    assert [getattr(nb.make_config("demo", **given), name) for name in given] == expanded
    assert [getattr(dataclasses.replace(nb.make_config("demo"), **given), name) for name in given] == expanded
    cfg = nb.make_config("demo")
    for name, value in given.items():
        setattr(cfg, name, value)
    assert [getattr(cfg, name) for name in given] == expanded


@pytest.mark.parametrize("name", ["checkpoint_dir", "cache_dir", "figure_dir", "embedded_dir"])
def test_a_folder_to_write_that_is_a_file_is_refused_when_the_config_is_made(nb, tmp_path, name):
    """A checkpoint file given as checkpoint_dir (init_from's value in the wrong field) was accepted, and the
    run failed when it first wrote there: after the data was read, for the cache after a conversion."""
    checkpoint = tmp_path / "demo_vit_tiny8.pth"
    checkpoint.write_bytes(b"PK")
    with pytest.raises(nb.ConfigError, match=rf"{name}='{checkpoint}': {checkpoint} is a file, not a folder, "
                                             r"so nothing can be written there"):
        nb.make_config("demo", **{name: str(checkpoint)})
    with pytest.raises(nb.ConfigError, match=rf"{name}='{checkpoint}/runs': {checkpoint} is a file, not a "
                                             r"folder, so nothing can be written under it"):
        nb.make_config("demo", **{name: str(checkpoint / "runs")})
    made = nb.make_config("demo", **{name: str(tmp_path / "new" / "folder")})   # a folder yet to be made
    assert getattr(made, name) == str(tmp_path / "new" / "folder") and not (tmp_path / "new").exists()


def test_the_checks_that_train_in_seconds_keep_min_lr_below_their_own_peak(nb):
    """seconds_long shrinks the batch to 4 and kept min_lr: with base_lr a tenth of imagenet64's (the advice for
    init_from), the crash checks' config was refused (peak 7.8e-07 < min_lr 1e-06)."""
    cfg = nb.make_config("imagenet64", base_lr=5e-5)
    shrunk = nb.seconds_long(cfg)
    assert shrunk.batch_size == 4 and shrunk.min_lr == pytest.approx(5e-5 * 4 / 256)
    assert nb.seconds_long(nb.make_config("demo")).min_lr == nb.make_config("demo").min_lr   # already below


def test_override_keys_that_are_no_field_names_are_refused_by_name(nb):
    """YAML's `{on: 1}` (a boolean key) and `--set profile=short` stopped with Python's TypeError."""
    with pytest.raises(nb.ConfigError, match=r"overrides has keys \[True, 2\]: keys are Config field names"):
        nb.config_from_parameters("demo", yaml.safe_load("{on: 1, 2: 3, epochs: 1}"))
    with pytest.raises(SystemExit, match=r"--set profile=short: the profile is an option of its own: --profile short"):
        parse_overrides(["epochs=1", "profile=short"])


def test_a_profile_among_the_overrides_says_it_is_a_parameter_of_its_own(nb):
    with pytest.raises(nb.ConfigError, match=r"overrides holds profile='short': the profile is the notebook's "
                                             r"other parameter; give it as -p profile short"):
        nb.config_from_parameters("demo", {"profile": "short", "epochs": 1})
    with pytest.raises(nb.ConfigError, match=r"unknown profile \['demo'\]"):   # not 'unhashable type'
        nb.make_config(["demo"])


def test_the_scripts_read_set_values_in_either_spelling(nb):
    """torchrun_train.py read `--set` values as Python literals and bench_learn.py as JSON, so `compile=false`
    worked in one and was refused in the other ('false' is no bool). Both now read both spellings."""
    from benchmarks import bench_learn
    assert bench_learn.parse_overrides is parse_overrides   # the one parser of the scripts
    json_style = parse_overrides(["compile=false", "global_crop_scale=[0.5, 1.0]", "seed=3"])
    python_style = parse_overrides(["compile=False", "global_crop_scale=(0.5, 1.0)", "seed=3"])
    assert json_style == {"compile": False, "global_crop_scale": [0.5, 1.0], "seed": 3}
    assert parse_overrides(["a=null"]) == parse_overrides(["a=None"]) == {"a": None}
    assert nb.make_config("demo", **json_style) == nb.make_config("demo", **python_style)
    assert parse_overrides(["arch=vit_small", "run_name=a=b"]) == {"arch": "vit_small", "run_name": "a=b"}
    for wrong, said in [("epochs", "expects key=value"), ("=3", "expects key=value")]:
        with pytest.raises(SystemExit, match=said):
            parse_overrides([wrong])
    with pytest.raises(SystemExit, match="gives seed twice"):
        parse_overrides(["seed=1", "seed=2"])


def test_repeated_set_options_add_up_and_text_fields_keep_their_text(nb, monkeypatch):
    """`--set epochs=7 --set batch_size=4` trained with batch_size alone (argparse kept the last --set), and
    `run_name=123` was refused as an int: a str field keeps its text."""
    import torchrun_train
    made = {}
    class Made(Exception):
        pass
    def stop(profile, **overrides):
        made.update(overrides)
        raise Made
    monkeypatch.setattr(torchrun_train, "load_notebook",
                        lambda: type("NB", (), dict(make_config=stop, Config=nb.Config, ConfigError=nb.ConfigError)))
    with pytest.raises(Made):
        torchrun_train.main(["--profile", "demo", "--set", "epochs=7", "--set", "batch_size=4", "run_name=123"])
    assert made == {"epochs": 7, "batch_size": 4, "run_name": "123"}
    assert parse_overrides(["run_name=1e3", "arch=vit_small", "seed=1e3"], nb.Config) == \
        {"run_name": "1e3", "arch": "vit_small", "seed": 1000.0}   # (a float seed is then refused by name)


def test_a_missing_value_says_which_cell_makes_it(nb):
    """After a refused setting the names a cell makes held None, and a cell using one failed with
    "'NoneType' object has no attribute 'seed'"; Missing says what is missing and which cell makes it."""
    cfg = nb.Missing("config", "the settings cell (Setup) again")
    for use in (lambda: cfg.seed, lambda: len(cfg), lambda: cfg[0], lambda: bool(cfg), lambda: list(cfg)):
        with pytest.raises(RuntimeError, match=r"no config: run the settings cell \(Setup\) again \(it failed"):
            use()
    assert not hasattr(cfg, "_repr_html_")   # what IPython probes for is simply absent
    with pytest.raises(RuntimeError, match="no data set loaded: run the cell that makes it again"):
        nb.require(nb.Missing("data set"), "data set")
    assert nb.require(0, "zero") == 0


def test_a_working_folder_without_the_projects_files_gets_a_note_that_names_it(nb, tmp_path):
    note = nb.working_folder_note(tmp_path)
    assert str(tmp_path.resolve()) in note and "--cwd" in note and "data/, checkpoints/ and figures/" in note
    assert nb.working_folder_note(Path(__file__).resolve().parent.parent) is None   # the project's folder
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "demo_vit_tiny8.pth").write_bytes(b"")   # the project, one of its two files left
    assert nb.working_folder_note(tmp_path) is None
