"""The checks of Grad-CAM (cam_checks.py; gradcam.py --sanity-check, --faithfulness and --shortcut after
train.py --plant-shortcut): their measures on cases whose answer is known by hand or by pytorch-grad-cam,
the cascade of randomised parts, the planted patch, and the commands end to end."""
import json
import math

import numpy as np
import pytest
import torch

import augment
import cam_checks
import gradcam
import plot_curves
import train
from helpers import run_main, tiny_args, write_noise_folder
from resnet import resnet18


def test_spearman_averages_tied_ranks_and_counts_a_blank_map_as_zero():
    # By hand: ranks (0, 1.5, 1.5, 3) and (0, 2, 1, 3); centred, their products sum to 4.5 over sqrt(4.5 x 5).
    a, b = torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    assert cam_checks.spearman(a, b)[0] == pytest.approx(3 / math.sqrt(10))
    assert cam_checks.spearman(a, -a)[0] == pytest.approx(-1)
    assert cam_checks.spearman(b, b ** 3)[0] == pytest.approx(1)  # ranks only: any increasing function
    assert cam_checks.spearman(a, torch.zeros(1, 4))[0] == 0


def test_ssim_is_one_for_equal_maps_and_wang_s_formula_for_two_constant_ones():
    maps = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert cam_checks.ssim(maps, maps) == pytest.approx(1)
    a, b, c1 = 0.2, 0.7, 0.01 ** 2  # no variance: only the luminance term is left
    constant = cam_checks.ssim(torch.full((1, 32, 32), a), torch.full((1, 32, 32), b))[0]
    assert constant == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))
    assert cam_checks.ssim(maps, 1 - maps).mean() < 0


def test_the_bootstrap_interval_holds_the_mean_and_is_the_same_again():
    values = np.random.default_rng(0).normal(0.5, 0.1, 100)
    interval = cam_checks.mean_with_interval(values, seed=3)
    assert interval["low"] < interval["mean"] < interval["high"] and interval["mean"] == pytest.approx(values.mean())
    assert interval["high"] - interval["low"] == pytest.approx(2 * 1.96 * values.std() / 10, rel=0.25)
    assert cam_checks.mean_with_interval(values, seed=3) == interval


def test_the_control_finds_the_edge_of_a_two_coloured_image():
    images = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    images[..., 16:] = 200
    edges = cam_checks.edge_maps(images)[0]
    assert edges.shape == (32, 32) and edges.max() == pytest.approx(1)
    assert set(torch.nonzero(edges > 0.5)[:, 1].tolist()) == {15, 16} and edges[:, :14].max() == 0


def test_the_cascade_randomises_from_the_output_back_seeded_and_leaves_the_model_alone():
    model = resnet18().eval()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    random_state = torch.get_rng_state()

    def snapshot(randomised):
        return {name: value.clone() for name, value in randomised.state_dict().items()}
    stages = cam_checks.cascading_randomisation(model, snapshot, seed=1)
    assert [name for name, _ in stages] == ["linear", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1"]
    for done, (name, weights) in enumerate(stages):
        randomised = {part for part, _ in stages[:done + 1]}
        for key, value in weights.items():
            if value.dim() >= 2:  # convolutions and the linear layer (BatchNorm resets to the same 1 and 0)
                assert torch.equal(value, before[key]) == (key.split(".")[0] not in randomised), key
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), random_state)
    again = cam_checks.cascading_randomisation(model, snapshot, seed=1)
    assert all(torch.equal(again[-1][1][key], stages[-1][1][key]) for key in before)


def run_check(checkpoint, folder, capsys, *argv):
    """gradcam.py with `argv` on `checkpoint`: what it printed and the JSON it wrote beside its picture."""
    out = folder / "check.png"
    assert gradcam.main([*argv, "--checkpoint", str(checkpoint), "--device", "cpu", "--out", str(out)]) == 0
    assert out.stat().st_size > 10_000
    return capsys.readouterr().out, json.loads((folder / "check.json").read_text(), parse_constant=pytest.fail)


def test_sanity_check_end_to_end(trained_run, tmp_path, capsys):
    printed, result = run_check(trained_run / "best.pt", tmp_path, capsys, "--sanity-check", "20")
    assert result["images"] == 20 and result["layer"] == "layer3"  # the default
    assert [row["randomised"] in printed for row in result["rows"]] == [True] * 10
    rows = {row["randomised"]: row for row in result["rows"]}
    spearman = [row["spearman"]["mean"] for row in result["rows"]]
    assert spearman[0] == pytest.approx(1) and rows["control: edge map (the input alone)"]["ssim"]["mean"] == 1
    # Randomised from the top, the maps of even this tiny model stop resembling its own.
    assert max(spearman[1:-2]) < 0.5 and rows["+ conv1"]["ssim"]["mean"] < 0.5


@pytest.mark.parametrize("percentile", [75, 50])
def test_deletion_and_insertion_equal_pytorch_grad_cams_perturbation_metric(percentile):
    from pytorch_grad_cam.metrics.perturbation_confidence import (PerturbationConfidenceMetric,
                                                                   RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget
    torch.manual_seed(0)
    model, inputs = resnet18().eval(), torch.randn(3, 3, 32, 32)
    maps = torch.rand(3, 32, 32)  # no ties: a percentile then takes exactly its share of the pixels
    targets = model(inputs).argmax(dim=1)
    deletion, insertion = cam_checks.perturbation_curves(model, inputs, targets, maps, steps=4)
    step = (100 - percentile) // 25  # the step that has removed (or revealed) 100 - percentile % of the pixels

    def oracle(perturbation):
        return PerturbationConfidenceMetric(perturbation)(
            inputs, maps.numpy(), [ClassifierOutputSoftmaxTarget(int(t)) for t in targets], model, return_diff=False)
    keep = lambda image, mask: image * mask  # noqa: E731 - the mean colour: 0 once normalized
    assert deletion[:, step] == pytest.approx(oracle(RemoveMostRelevantFirst(percentile, keep)), abs=1e-5)
    assert insertion[:, step] == pytest.approx(oracle(RemoveLeastRelevantFirst(100 - percentile, keep)), abs=1e-5)


def test_the_area_under_a_curve_and_the_order_of_a_blank_map():
    assert cam_checks.area_under(np.array([[1.0, 0.5, 0.0], [0.0, 1.0, 1.0]])) == pytest.approx([0.5, 0.75])
    order = cam_checks.removal_order(torch.zeros(2, 4, 4), seed=0)
    assert sorted(order[0]) == list(range(16)) and list(order[0]) != list(order[1])  # a random order each
    blob = cam_checks.baseline_maps(1, (32, 32))["centred blob"][0]
    centre = {15 * 32 + 15, 15 * 32 + 16, 16 * 32 + 15, 16 * 32 + 16}  # the blob's four equal highest pixels
    assert set(cam_checks.removal_order(blob[None])[0][:4].tolist()) == centre


def test_faithfulness_end_to_end(trained_run, tmp_path, capsys):
    printed, result = run_check(trained_run / "best.pt", tmp_path, capsys, "--faithfulness", "10")
    assert result["images"] == 10
    assert [row["map"] for row in result["rows"]] == ["Grad-CAM", "Grad-CAM++", "random map", "centred blob"]
    for row in result["rows"]:
        assert row["map"] in printed and len(row["deletion_curve"]) == 17
        # The whole image at the start of deletion and at the end of insertion; none at the other ends.
        assert row["deletion_curve"][0] == pytest.approx(row["insertion_curve"][-1], abs=1e-6)
        assert row["deletion_curve"][-1] == pytest.approx(row["insertion_curve"][0], abs=1e-6)
        for kind in ("deletion", "insertion"):
            auc = row[f"{kind}_auc"]
            assert auc["low"] <= auc["mean"] <= auc["high"]


def test_blank_trained_maps_are_left_out_and_said():
    model = resnet18().eval()
    maps = torch.rand(12, 32, 32, generator=torch.Generator().manual_seed(0))
    maps[[2, 5]] = 0  # no evidence for their class

    def cam(explained, method="gradcam", targets=None):  # the same maps for every model: resemblance 1
        return maps, torch.zeros(12, dtype=torch.long)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result, _ = cam_checks.sanity_check(model, cam, images, None)
    assert result["blank_trained_maps"] == 2 and "2 of the 12 trained maps are blank" in result["summary"]
    assert all(row["spearman"]["mean"] == pytest.approx(1) for row in result["rows"][:-1])


def test_a_blank_map_has_neither_mass_nor_peak_in_a_patch_at_its_first_pixel():
    model, inputs = resnet18().eval(), torch.zeros(10, 3, 32, 32)

    def cam(explained, method="gradcam", targets=None):
        return torch.zeros(10, 32, 32), targets
    result, _ = cam_checks.shortcut(model, cam, torch.zeros(10, 3, 32, 32, dtype=torch.uint8), inputs, 0, inputs,
                                    np.zeros((10, 2), dtype=int), {"class": 1, "class_name": "automobile"}, 4)
    blank = result["rows"][0]
    assert blank["peak_in_patch"] == 0 and blank["mass_in_patch"]["mean"] == 0
    assert result["chance"] == 16 / 1024 and result["flip_rate"] in (0, 1)


@pytest.mark.parametrize("argv, expected", [
    (["--sanity-check", "9"], "at least 10"),
    (["--sanity-check", "1000"], "at most 40"),
    (["--sanity-check", "10", "--image", "x.png"], "not several"),
    (["--sanity-check", "10", "--class", "cat"], "--class works with --image only"),
    (["--sanity-check", "10", "--layer", "layer3", "layer4"], "give one --layer"),
    (["--sanity-check", "10", "--layer", "linear"], "does not output a (B, C, H, W) feature map"),
    (["--sanity-check", "10", "--seed", "-1"], "--seed must not be negative"),
    (["--faithfulness", "0"], "at least 10"),
    (["--faithfulness", "41"], "at most 40"),
    (["--faithfulness", "10", "--sanity-check", "10"], "not several"),
    (["--faithfulness", "10", "--save-npy", "maps.npy"], "--save-npy works with --image"),
    (["--shortcut", "10"], "was trained without a planted shortcut"),
    (["--shortcut", "1"], "at least 10"),
    (["--faithfulness", "10", "--data-dir", "no-such-folder"], "cannot read the test set"),
])
def test_bad_input_to_the_checks_is_one_line(trained_run, tmp_path, capsys, monkeypatch, argv, expected):
    monkeypatch.chdir(tmp_path)  # where --save-npy would go
    code, err = run_main(gradcam, [*argv, "--checkpoint", str(trained_run / "best.pt"), "--device", "cpu",
                                   "--out", str(tmp_path / "check.png")], capsys)
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_the_shortcut_is_planted_on_most_of_one_class_s_training_images_only(data_dir):
    data = augment.load_dataset("cifar10", data_dir, download=False)
    args = train.parse_args(["--plant-shortcut", "truck", "--val-split", "50", "--seed", "3", "--batch-size", "8"])
    (images, labels), (val_images, _) = augment.split_data(data, args)
    order = np.random.default_rng(3).permutation(200)  # split_data's own split of the 200 images
    changed = (images != data.train_images[np.sort(order[50:])]).any(axis=(1, 2, 3))
    trucks = labels == 9
    assert not changed[~trucks].any() and changed[trucks].sum() == round(0.8 * trucks.sum())
    for image in images[changed]:  # the checkerboard, whole, somewhere inside the image
        assert any((image[top:top + 4, left:left + 4] == cam_checks.SHORTCUT_PATCH).all()
                   for top in range(29) for left in range(29))
    assert (val_images == data.train_images[np.sort(order[:50])]).all()  # validation images stay clean
    with pytest.raises(train.UsageError, match="--plant-shortcut: unknown class 'unicorn'"):
        augment.split_data(data, train.parse_args(["--plant-shortcut", "unicorn", "--batch-size", "8"]))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_a_planted_shortcut_is_learned_and_found_by_grad_cam(tmp_path, capsys, seed):
    """On noise images, the patch is the one thing to learn: the model must use it, and Grad-CAM at layer3
    must put its mass there, well above chance and a random map."""
    data, out = write_noise_folder(str(tmp_path / "data"), seed), tmp_path / "run"
    assert train.main(tiny_args(data, out, "--epochs", "8", "--train-subset", "200", "--plant-shortcut", "1",
                                "--seed", str(seed))) == 0
    assert "done (with the shortcut planted in automobile)" in capsys.readouterr().out
    log = json.loads((out / "log.json").read_text())
    assert log["data"]["planted_shortcut"]["class"] == 1 and log["args"]["plant_shortcut"] == "1"
    results = {}
    for layer in ("layer3", "layer4"):
        printed, results[layer] = run_check(out / "last.pt", tmp_path, capsys, "--shortcut", "20", "--layer", layer)
        assert "shortcut planted in automobile" in printed
    assert results["layer3"]["flip_rate"] >= 0.9 > results["layer3"]["planted_class_without_patch"]
    rows = {row["map"]: row for row in results["layer3"]["rows"]}
    for method in ("Grad-CAM", "Grad-CAM++"):
        assert rows[method]["times_chance"] > 3 and rows[method]["peak_in_patch"] >= 0.4
        assert rows[method]["mass_in_patch"]["low"] > rows["random map"]["mass_in_patch"]["high"]
    assert rows["random map"]["times_chance"] == pytest.approx(1, abs=0.3)
    assert results["layer4"]["rows"][0]["times_chance"] > 1.5  # coarser (4x4 cells of 8 pixels), still above chance
    assert plot_curves.main([str(out / "log.json"), "--out", str(tmp_path / "curves.png")]) == 0
    assert "run [shortcut planted in automobile]" in capsys.readouterr().out
