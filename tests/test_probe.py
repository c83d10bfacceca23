"""train.py --probe: Grad-CAM of fixed test images after every epoch (probe.py), written to probe.npz, resumed
with the run, and drawn by plot_curves.py as a grid and an animation."""
import argparse
import json

import numpy as np
import torch
from PIL import Image

import gradcam
import plot_curves
import probe
import train

from helpers import interrupt_after_epoch, tiny_args


def test_the_probe_takes_one_image_per_class_first_seeded():
    labels = torch.arange(100) % 10
    picked = probe.pick(labels, 14, seed=3)
    assert labels[picked].tolist() == list(range(10)) + [0, 1, 2, 3]  # a class each, then a second of each
    assert len(set(picked.tolist())) == 14 and picked.tolist() == probe.pick(labels, 14, seed=3).tolist()
    assert picked.tolist() != probe.pick(labels, 14, seed=4).tolist()
    assert len(probe.pick(labels, 500, seed=0)) == 100  # at most the test images


# The file keeps float16 maps (2 KiB an image): values in [0.5, 1] are rounded by up to half a step of 2**-11.
FLOAT16_ROUNDING = 2**-12


def gradcam_maps(checkpoint, saved, tmp_path):
    """gradcam.py's maps of the probe images (written as PNG files, as a user would give them): for the true
    class (--class, an image at a time) and for the prediction (all at once)."""
    paths = []
    for i, image in enumerate(saved["images"]):
        paths.append(str(tmp_path / f"probe{i}.png"))
        Image.fromarray(image).save(paths[-1])
    common = ["--layer", "layer4", "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(tmp_path / "g.png")]
    assert gradcam.main(["--image", *paths, *common, "--save-npy", str(tmp_path / "predicted.npy")]) == 0
    true = []
    for path, label in zip(paths, saved["labels"]):
        argv = ["--image", path, "--class", str(label), *common, "--save-npy", str(tmp_path / "t.npy")]
        assert gradcam.main(argv) == 0
        true.append(np.load(tmp_path / "t.npy")[0, 0])
    return np.stack(true), np.load(tmp_path / "predicted.npy")[:, 0]


def test_the_probes_maps_are_gradcams_maps_of_each_epochs_checkpoint_and_survive_a_resume(
        data_dir, tmp_path, monkeypatch):
    interrupt_after_epoch(monkeypatch, 1)
    assert train.main(tiny_args(data_dir, tmp_path, "--probe", "12")) == 130
    monkeypatch.undo()
    first = dict(np.load(tmp_path / "probe.npz"))
    assert first["epochs"].tolist() == [1] and first["maps_true"].shape == (1, 12, 32, 32)
    assert first["maps_true"].dtype == np.float16 and str(first["layer"]) == "layer4"
    true, predicted = gradcam_maps(tmp_path / "last.pt", first, tmp_path)
    assert np.abs(first["maps_true"][0] - true).max() <= FLOAT16_ROUNDING + 1e-5
    assert np.abs(first["maps_predicted"][0] - predicted).max() <= FLOAT16_ROUNDING + 1e-5
    # The checkpoint holds the maps in float16 too: the file's are exactly its.
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["probe"]
    assert torch.equal(saved["epochs"][0]["maps_true"], torch.from_numpy(first["maps_true"][0]))

    assert train.main(["--resume", str(tmp_path / "last.pt"), "--device", "cpu", "--workers", "0"]) == 0
    second = dict(np.load(tmp_path / "probe.npz"))
    assert second["epochs"].tolist() == [1, 2] and np.array_equal(second["images"], first["images"])
    assert np.array_equal(second["maps_true"][0], first["maps_true"][0])
    true, predicted = gradcam_maps(tmp_path / "last.pt", second, tmp_path)
    assert np.abs(second["maps_predicted"][1] - predicted).max() <= FLOAT16_ROUNDING + 1e-5
    assert np.abs(second["maps_true"][1] - true).max() <= FLOAT16_ROUNDING + 1e-5
    log = json.loads((tmp_path / "log.json").read_text())
    assert all(record["probe_seconds"] > 0 for record in log["epochs"])


def test_probe_0_writes_no_probe_and_leaves_none_of_a_replaced_run(trained_run, data_dir, tmp_path):
    (tmp_path / "probe.npz").write_bytes((trained_run / "probe.npz").read_bytes())  # another run's
    assert train.main(tiny_args(data_dir, tmp_path, "--probe", "0", "--epochs", "1", "--overwrite")) == 0
    assert not (tmp_path / "probe.npz").exists()
    assert torch.load(tmp_path / "last.pt", weights_only=True)["probe"] is None
    assert "probe_seconds" not in json.loads((tmp_path / "log.json").read_text())["epochs"][0]


def test_plot_curves_draws_the_probe_as_a_grid_and_an_animation(trained_run, tmp_path, capsys):
    assert plot_curves.PROBE_NAME == probe.PROBE_NAME  # the two scripts agree on the file
    args = argparse.Namespace(logs=[str(trained_run / "log.json")], out=str(tmp_path / "run.png"), labels=None,
                              confusion=False)
    assert plot_curves.plot(args)[-1] == f"wrote {tmp_path / 'run_probe.png'} and {tmp_path / 'run_probe.gif'}"
    with Image.open(tmp_path / "run_probe.gif") as animation:
        assert animation.n_frames == 2  # a frame per epoch
    assert Image.open(tmp_path / "run_probe.png").size[0] > 1000


def test_a_probe_an_epoch_ahead_of_its_log_is_drawn_up_to_the_log(trained_run, tmp_path):
    # A kill between probe.npz and log.json leaves the probe one epoch ahead (a resume repairs it).
    log = json.loads((trained_run / "log.json").read_text())
    log["epochs"] = log["epochs"][:1]
    (tmp_path / "log.json").write_text(json.dumps(log))
    (tmp_path / "probe.npz").write_bytes((trained_run / "probe.npz").read_bytes())
    assert plot_curves.main([str(tmp_path / "log.json"), "--no-confusion"]) == 0
    with Image.open(tmp_path / "log_probe.gif") as animation:
        assert animation.n_frames == 1


def test_a_damaged_probe_file_is_a_warning_and_the_curves_are_drawn(trained_run, tmp_path, capsys):
    for name in ("log.json", "probe.npz"):
        (tmp_path / name).write_bytes((trained_run / name).read_bytes())
    (tmp_path / "probe.npz").write_bytes(b"PK\x03\x04 not a zip")
    assert plot_curves.main([str(tmp_path / "log.json")]) == 0
    err = capsys.readouterr().err
    assert "probe.npz is not a probe file that train.py wrote" in err and (tmp_path / "log_curves.png").exists()
    assert not (tmp_path / "log_probe.png").exists()
