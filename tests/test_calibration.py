"""Calibration (loop.py): the expected calibration error and NLL of each epoch's test predictions, the
reliability diagram's bins, and the temperature fitted on the validation images."""
import argparse
import json
import math

import pytest
import torch

import loop
import plot_curves
import train

from helpers import tiny_args


def ece_of(logits, labels):
    return loop.reliability(loop.calibration_sums(logits, labels).tolist())["ece"]


def logits_with_confidence(confidence, num_classes=10):
    """Logits whose top class (class 0) has probability `confidence` (a tensor), the others sharing the rest."""
    top = torch.log(confidence * (num_classes - 1) / (1 - confidence))
    return torch.cat([top[:, None], torch.zeros(len(confidence), num_classes - 1)], dim=1)


def test_a_calibrated_set_has_an_ece_of_zero_within_sampling_noise():
    generator = torch.Generator().manual_seed(0)
    confidence = 0.1 + 0.89 * torch.rand(200_000, generator=generator)
    right = torch.rand(200_000, generator=generator) < confidence  # right exactly as often as it is sure
    labels = torch.where(right, 0, 1 + torch.randint(0, 9, (200_000,), generator=generator))
    ece = ece_of(logits_with_confidence(confidence), labels)
    assert ece < 0.005  # sampling noise: about sqrt(p(1-p)/n) per bin, below 0.003 here


def test_an_over_confident_set_has_the_known_ece_and_its_bins():
    confidence = torch.full((1000,), 0.9)
    labels = (torch.arange(1000) >= 600).long()  # class 0, always predicted, is right for 60%
    result = loop.reliability(loop.calibration_sums(logits_with_confidence(confidence), labels).tolist())
    assert result["ece"] == pytest.approx(0.3, abs=1e-4)  # float32 sums, as on any device
    bins = result["reliability"]
    assert bins["count"][13] == 1000 and sum(bins["count"]) == 1000  # 0.9 lies in (13/15, 14/15]
    assert bins["confidence"][13] == pytest.approx(0.9, abs=1e-4) and bins["accuracy"][13] == pytest.approx(0.6)
    assert bins["accuracy"][:13] == [None] * 13 and bins["accuracy"][14] is None


def test_a_certain_prediction_is_in_the_last_bin():
    # Guo et al.'s bins are (i/15, (i+1)/15]: confidence 1 is in the last, 0.5 in the eighth.
    logits = torch.tensor([[0.0, -200.0], [0.0, 0.0]])  # confidence 1.0 and 0.5
    assert loop.reliability(loop.calibration_sums(logits, torch.zeros(2, dtype=torch.long)).tolist())[
        "reliability"]["count"] == [0] * 7 + [1] + [0] * 6 + [1]


def test_the_nll_at_each_temperature_and_the_fitted_temperature():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(5000, 10, generator=generator)
    labels = torch.distributions.Categorical(logits=logits).sample()  # calibrated at temperature 1
    sharpened = 3 * logits  # over-confident: the right temperature is 3
    nll = loop.nll_sums(sharpened, labels) / len(labels)
    one = int((loop.TEMPERATURES - 1).abs().argmin())
    assert loop.TEMPERATURES[one] == 1
    assert nll[one] == pytest.approx(torch.nn.functional.cross_entropy(sharpened, labels).item(), rel=1e-5)
    at_2 = int((loop.TEMPERATURES - 2).abs().argmin())
    assert nll[at_2] == pytest.approx(torch.nn.functional.cross_entropy(sharpened / 2, labels).item(), rel=1e-5)
    temperature = loop.fitted_temperature({"nll_by_temperature": nll.tolist()})
    assert 2.7 < temperature < 3.3
    assert ece_of(sharpened / temperature, labels) < ece_of(sharpened, labels) / 3


def test_evaluate_with_a_temperature_keeps_the_accuracy(data_dir):
    args = train.parse_args(tiny_args(data_dir, "unused"))
    model = loop.build_model(10, args, torch.device("cpu"))
    trainer = loop.Trainer(model, args, "fp32", torch.device("cpu"), (0.5,) * 3, (0.25,) * 3, 1)
    images = torch.randint(0, 256, (70, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(70) % 10
    plain, scaled = (loop.evaluate(trainer, images, labels, 10, 32, temperature=t, fit_temperature=True)
                     for t in (1.0, 2.5))
    assert plain["confusion"] == scaled["confusion"] and plain["acc"] == scaled["acc"]
    right = sum(k * a for k, a in zip(scaled["reliability_scaled"]["count"], scaled["reliability_scaled"]["accuracy"])
                if k)
    assert right == pytest.approx(plain["acc"] * 70)  # the same images right, whatever the temperature
    assert scaled["ece"] == plain["ece"] and scaled["ece_scaled"] != plain["ece"]
    grid_point = int((loop.TEMPERATURES - 2.5).abs().argmin())  # 2.5 is 0.2% from one
    assert scaled["nll_scaled"] == pytest.approx(scaled["nll_by_temperature"][grid_point], rel=1e-3)
    assert plain["nll"] == scaled["nll"] == pytest.approx(plain["nll_scaled"])


def test_a_run_records_calibration_and_plots_it(data_dir, tmp_path):
    assert train.main(tiny_args(data_dir, tmp_path, "--val-split", "16")) == 0
    log = json.loads((tmp_path / "log.json").read_text())
    for record in log["epochs"]:
        assert 0 <= record["test_ece"] <= 1 and record["test_nll"] > 0 and 0 <= record["test_ece_scaled"] <= 1
        assert any(math.isclose(record["temperature"], t) for t in loop.TEMPERATURES.tolist())
    bins = log["reliability"]
    assert sum(bins["count"]) == log["data"]["test_images"] and len(bins["accuracy"]) == loop.CALIBRATION_BINS
    args = argparse.Namespace(logs=[str(tmp_path / "log.json")], out=None, labels=None, confusion=True)
    assert f"wrote {tmp_path / 'log_confusion.png'}" in plot_curves.plot(args)
