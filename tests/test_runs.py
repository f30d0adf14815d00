"""A run is its settings: the run folder, settings.json, and the teacher the later sections load."""
import dataclasses
import json

import pytest
import torch


def tiny(nb, tmp_path, **kw):
    return nb.make_config("demo", checkpoint_dir=str(tmp_path / "ckpt"), figure_dir=str(tmp_path / "fig"), **kw)


def test_free_or_same_settings_use_the_run_name_folder(nb, tmp_path):
    cfg = tiny(nb, tmp_path)
    run_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    assert run_dir == tmp_path / "ckpt" / "demo"
    assert json.loads((run_dir / "settings.json").read_text()) == nb.run_settings(cfg)
    resumable = dataclasses.replace(cfg, log_every_steps=7, eval_every_epochs=3, num_workers=2)
    assert nb.run_directory(resumable) == run_dir


def test_changed_settings_go_to_their_own_folder_and_leave_the_old_run_alone(nb, tmp_path, capsys):
    cfg = tiny(nb, tmp_path)
    old_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    (old_dir / "last.pth").write_bytes(b"the finished run's checkpoint")
    before = {p.name: p.read_bytes() for p in old_dir.iterdir()}
    changed = dataclasses.replace(cfg, batch_size=8)
    new_dir = nb.record_settings(changed, nb.run_directory(changed, verbose=True))
    assert new_dir != old_dir and new_dir.name.startswith("demo-") and len(new_dir.name) == len("demo-") + 8
    said = capsys.readouterr().out
    assert "batch_size" in said and f"trained from the start (to start from that run's weights instead, set " \
                                   f"init_from='{old_dir / 'last.pth'}')" in said
    assert {p.name: p.read_bytes() for p in old_dir.iterdir()} == before
    assert nb.run_directory(changed) == new_dir  # stable: the same settings find the same folder
    assert nb.run_directory(cfg) == old_dir


def test_the_notice_of_changed_settings_says_what_happens_and_offers_only_weights_that_fit(nb, tmp_path, capsys):
    """It said 'trained from the start' to a run it then resumed, and offered init_from for a model of another
    shape (refused) or a file that was not there."""
    cfg = tiny(nb, tmp_path)
    old_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    other_head = dataclasses.replace(cfg, out_dim=32)
    nb.run_directory(other_head, verbose=True)   # no file in the old run yet
    assert capsys.readouterr().out.rstrip().endswith(", trained from the start")
    (old_dir / "teacher.pth").write_bytes(b"a finished run's teacher")
    nb.run_directory(other_head, verbose=True)   # a head of another size does not take its weights
    assert capsys.readouterr().out.rstrip().endswith(", trained from the start")
    longer = dataclasses.replace(cfg, epochs=cfg.epochs + 1)
    nb.record_settings(longer, nb.run_directory(longer, verbose=True))
    assert f"init_from='{old_dir / 'teacher.pth'}'" in capsys.readouterr().out
    nb.run_directory(longer, verbose=True)   # its own folder holds it now: resumed, not started again
    said = capsys.readouterr().out
    assert "this run is demo-" in said and "from the start" not in said


def test_unreadable_settings_name_the_file(nb, tmp_path):
    cfg = tiny(nb, tmp_path)
    run_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    for text in ("{not json", "[1, 2]"):
        (run_dir / "settings.json").write_text(text)
        with pytest.raises(ValueError, match="settings.json"):
            nb.run_directory(cfg)


def test_a_run_recorded_before_a_setting_existed_is_the_same_run_after_an_upgrade(nb, tmp_path, capsys):
    """settings.json of a run trained before centering and koleo_weight existed lacks them: after a git pull its
    settings looked changed, so the run was trained again from the start in another folder, and evaluation
    looked for a teacher there ('run the Training section first') beside the finished one."""
    cfg = tiny(nb, tmp_path)
    run_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    older = {k: v for k, v in nb.run_settings(cfg).items() if k not in ("centering", "koleo_weight")}
    (run_dir / "settings.json").write_text(json.dumps(older))
    assert nb.run_directory(cfg, verbose=True) == run_dir and capsys.readouterr().out == ""
    with_koleo = dataclasses.replace(cfg, koleo_weight=0.1)   # no older version trained with KoLeo: another run
    assert nb.run_directory(with_koleo, verbose=True) != run_dir
    assert "{'koleo_weight': (0.0, 0.1)}" in capsys.readouterr().out


def test_an_unfinished_runs_missing_teacher_names_the_checkpoint_that_can_be_evaluated(nb, tmp_path):
    cfg = dataclasses.replace(tiny(nb, tmp_path), demo_checkpoint=str(tmp_path / "absent.pth"))
    run_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    (run_dir / "last.pth").write_bytes(b"an unfinished run's checkpoint")
    with pytest.raises(nb.NotTrainedYet, match=rf"run the Training section first, or evaluate its newest checkpoint "
                                               rf"as it is: evaluate_file='{run_dir / 'last.pth'}'"):
        nb.trained_teacher(cfg, torch.device("cpu"))


def test_trained_teacher_comes_from_a_finished_run_only(nb, tmp_path):
    cfg = dataclasses.replace(tiny(nb, tmp_path), demo_checkpoint=str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="run the Training section"):
        nb.trained_teacher(cfg, torch.device("cpu"))
    trained = nb.build_backbone(cfg, drop_path_rate=0.0)
    with torch.no_grad():
        trained.cls_token.fill_(0.25)
    torch.save(trained.state_dict(), nb.record_settings(cfg, nb.run_directory(cfg)) / "teacher.pth")
    backbone, path = nb.trained_teacher(cfg, torch.device("cpu"))
    assert path.name == "teacher.pth" and not backbone.training
    assert torch.equal(backbone.cls_token, trained.cls_token)


def test_initial_backbone_is_the_same_network_whatever_ran_before(nb, tmp_path):
    cfg = tiny(nb, tmp_path)
    first = nb.initial_backbone(cfg, torch.device("cpu"))
    torch.randn(1000)  # the global generator moves on
    state = torch.get_rng_state()
    second = nb.initial_backbone(cfg, torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), state)  # and is left alone
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))


def image_folder(root, classes=("a", "b"), per_class=4):
    from PIL import Image
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(root / c / f"{i}.png")
    return root


def test_the_demo_checkpoint_serves_the_embedded_sample_only(nb, tmp_path):
    demo_file = tmp_path / "demo_teacher.pth"
    torch.save(nb.build_backbone(nb.make_config("demo"), drop_path_rate=0.0).state_dict(), demo_file)
    embedded = tiny(nb, tmp_path, demo_checkpoint=str(demo_file))
    assert nb.teacher_source(embedded) == (demo_file, "the demo checkpoint: the demo profile run for 100 epochs on all of the embedded sample, on a GPU")
    folder = tiny(nb, tmp_path, demo_checkpoint=str(demo_file), data_root=str(image_folder(tmp_path / "photos")))
    run_dir = nb.run_directory(folder)
    path, what = nb.teacher_source(folder)
    assert path == run_dir / "teacher.pth" and what == f"the teacher of run {run_dir.name}, trained on data_root " \
        f"{tmp_path / 'photos'}"
    with pytest.raises(nb.NotTrainedYet, match=f"{run_dir}/teacher.pth .*does not exist; it is written when run "
                                               f"'{run_dir.name}' finishes: run the Training section first"):
        nb.trained_teacher(folder, torch.device("cpu"))
    chosen = tiny(nb, tmp_path, data_root=str(tmp_path / "photos"), evaluate_file=str(demo_file))
    assert nb.teacher_source(chosen) == (demo_file, "the file set as evaluate_file")
    assert nb.trained_teacher(chosen, torch.device("cpu"))[1] == demo_file


def test_a_demo_run_of_another_vit_shows_its_own_teacher_not_the_demo_checkpoint(nb, tmp_path):
    """The demo checkpoint is a ViT-T/8: a demo run of another arch or patch size cannot load it, so the
    Evaluation and Attention sections show that run's own teacher (they stopped with a shape error)."""
    demo_file = tmp_path / "demo_teacher.pth"
    torch.save(nb.build_backbone(nb.make_config("demo"), drop_path_rate=0.0).state_dict(), demo_file)
    for changed in (dict(arch="vit_small"), dict(patch_size=16)):
        cfg = tiny(nb, tmp_path, **changed)
        cfg = dataclasses.replace(cfg, demo_checkpoint=str(demo_file))   # as the profile's default is: unchecked
        assert not nb.demo_checkpoint_fits(cfg)
        run_dir = nb.run_directory(cfg)
        assert nb.teacher_source(cfg)[0] == run_dir / "teacher.pth"
        with pytest.raises(nb.NotTrainedYet, match="run the Training section first"):
            nb.trained_teacher(cfg, torch.device("cpu"))
    assert nb.demo_checkpoint_fits(tiny(nb, tmp_path, demo_checkpoint=str(demo_file)))


def test_another_models_figures_never_replace_the_runs_own(nb, tmp_path):
    """`evaluate_file` naming another run's teacher wrote its retrieval and attention figures over the run's
    own in figures/<run>/ (its features went apart, to models/<file>/): they now go there too."""
    import matplotlib.pyplot as plt
    cfg = tiny(nb, tmp_path)
    run_figures = tmp_path / "fig" / nb.run_directory(cfg).name
    other_run = tmp_path / "ckpt" / "elsewhere" / "teacher.pth"
    saved = {}
    for label, teacher_file in [("own", nb.run_directory(cfg) / "teacher.pth"), ("other", other_run), ("none", None)]:
        fig = plt.figure(figsize=(1, 1))
        fig.suptitle(label)
        saved[label] = nb.save_figure(fig, cfg, "retrieval", teacher_file=teacher_file)
        plt.close(fig)
    assert saved["own"] == saved["none"] == run_figures / "retrieval.jpg"
    assert saved["other"] == run_figures / "models" / "elsewhere-teacher" / "retrieval.jpg"
    assert saved["other"].parent.relative_to(tmp_path / "fig") == \
        nb.export_home(cfg, other_run).relative_to(tmp_path / "ckpt")   # the features' rule


def test_what_an_evaluation_exports_goes_to_its_own_run_folder_and_names_its_source(nb, tmp_path):
    cfg = tiny(nb, tmp_path, data_root=str(image_folder(tmp_path / "photos")))
    run_dir = nb.run_directory(cfg)
    other_run = tmp_path / "ckpt" / "elsewhere" / "teacher.pth"
    assert nb.export_home(cfg, run_dir / "teacher.pth") == run_dir
    assert nb.export_home(cfg, "checkpoints/demo_vit_tiny8.pth") == run_dir / "models" / "demo_vit_tiny8"
    assert nb.export_home(cfg, other_run) == run_dir / "models" / "elsewhere-teacher"   # never the other run's folder
    note = nb.write_source_note(run_dir / "features", cfg, run_dir / "teacher.pth", nb.data_label(cfg))
    assert json.loads(note.read_text()) == dict(
        model=str(run_dir / "teacher.pth"), model_is=f"the teacher of run {run_dir.name}, trained on data_root "
        f"{tmp_path / 'photos'}", arch="vit_tiny/8", data=f"data_root {tmp_path / 'photos'}", run=str(run_dir))
    assert nb.model_label(cfg, run_dir / "teacher.pth") == f"vit_tiny/8 teacher of run {run_dir.name}"
    assert nb.start_label(cfg) == "random init"


def test_what_runs_write_is_left_out_of_git_but_the_default_runs_figures_are_kept():
    """figures/<run>/ of a user's own run was untracked, so `git add -A` committed its figures."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    ignored = lambda path: subprocess.run(["git", "check-ignore", "-q", path], cwd=root).returncode == 0
    assert all(map(ignored, ["figures/my-run/attention_own_files.jpg", "checkpoints/my-run/last.pth",
                             "data/cache/train-0123456789-64px.u8"]))
    assert not any(map(ignored, ["figures/demo/new_figure.jpg", "checkpoints/demo_long/log.jsonl",
                                 "checkpoints/demo_vit_tiny8.pth", "data/README.md"]))
