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
    assert "batch_size" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in old_dir.iterdir()} == before
    assert nb.run_directory(changed) == new_dir  # stable: the same settings find the same folder
    assert nb.run_directory(cfg) == old_dir


def test_unreadable_settings_name_the_file(nb, tmp_path):
    cfg = tiny(nb, tmp_path)
    run_dir = nb.record_settings(cfg, nb.run_directory(cfg))
    for text in ("{not json", "[1, 2]"):
        (run_dir / "settings.json").write_text(text)
        with pytest.raises(ValueError, match="settings.json"):
            nb.run_directory(cfg)


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
