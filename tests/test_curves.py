"""plot_curves.py: pictures, summaries and bad logs; it never imports torch."""
import json
import shutil

import matplotlib.pyplot as plt

import plot_curves
import runfiles

from helpers import HERE, run_main


def assert_png(path, min_width=800, min_height=300):
    from PIL import Image
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width >= min_width and image.height >= min_height


def test_plot_curves_reads_what_train_writes(trained_run, tmp_path, capsys):
    assert plot_curves.LOG_FORMAT == runfiles.LOG_FORMAT  # the two scripts agree on the schema
    log_path = tmp_path / "log.json"
    shutil.copy(trained_run / "log.json", log_path)
    assert plot_curves.main([str(log_path)]) == 0
    out = capsys.readouterr().out
    assert_png(tmp_path / "log_curves.png")
    assert_png(tmp_path / "log_confusion.png")
    log = json.loads(log_path.read_text())
    final, best = log["summary"]["final_test_acc"], log["summary"]["best_test_acc"]
    row = out.splitlines()[1].split()
    assert row[1] == "2/2" and row[2] == f"{100 * final:.2f}%" and row[4] == f"{100 * best:.2f}%"
    assert row[5] == str(log["summary"]["best_test_acc_epoch"])


def test_plot_curves_partial_and_several_logs(trained_run, tmp_path, capsys):
    log = json.loads((trained_run / "log.json").read_text())
    partial = dict(log, epochs=log["epochs"][:1], summary=None)  # as the log looks during the run
    for key in ("per_class_accuracy", "confusion_matrix"):
        partial.pop(key)
    (tmp_path / "partial.json").write_text(json.dumps(partial))
    assert plot_curves.main([str(tmp_path / "partial.json")]) == 0
    assert_png(tmp_path / "partial_curves.png")
    assert not (tmp_path / "partial_confusion.png").exists()
    assert "1/2" in capsys.readouterr().out

    out = tmp_path / "compare.png"
    assert plot_curves.main([str(trained_run / "log.json"), str(tmp_path / "partial.json"), "--labels", "full",
                             "half", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("full ") and lines[2].startswith("half ")
    assert_png(out)


def test_plot_curves_writes_the_format_named_and_says_what_was_measured(trained_run, tmp_path, capsys):
    assert plot_curves.main([str(trained_run / "log.json"), "--out", str(tmp_path / "curves.pdf")]) == 0
    for name in ("curves.pdf", "curves_confusion.pdf"):  # PDF bytes, not PNG bytes in a .pdf
        assert (tmp_path / name).read_bytes()[:4] == b"%PDF", name
    log = json.loads((trained_run / "log.json").read_text())  # the tiny dataset: held-out images, not test
    summaries = [plot_curves.summary(log)] * 2
    title = plot_curves.curves_figure([log, log], ["a", "b"], summaries)._suptitle.get_text()
    assert "held-out" in title and "test" not in title, title
    # A class with no evaluated image (a --test-subset of 5 on 10 classes) has no accuracy: not 0%.
    per_class = dict(log["per_class_accuracy"], cat=None)
    figure = plot_curves.confusion_figure(dict(log, per_class_accuracy=per_class), "a")
    labels = [text.get_text() for text in figure.axes[1].texts]
    assert labels[log["classes"].index("cat")] == " no images"


def test_plot_curves_bad_input(trained_run, tmp_path, capsys):
    (tmp_path / "text.json").write_text("not json {")
    (tmp_path / "other.json").write_text(json.dumps({"loss": [1, 2]}))
    log = json.loads((trained_run / "log.json").read_text())
    (tmp_path / "empty.json").write_text(json.dumps(dict(log, epochs=[])))
    (tmp_path / "words.json").write_text(json.dumps(dict(log, epochs=[dict(log["epochs"][0], test_acc="high")])))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cases = [([str(tmp_path / "missing.json")], "not found"),
             ([str(tmp_path / "text.json")], "is not JSON"),
             ([str(tmp_path / "other.json")], "not a training log"),
             ([str(tmp_path / "empty.json")], "no finished epoch"),
             ([str(tmp_path / "words.json")], "without numbers for"),
             ([str(trained_run / "log.json"), "--out", str(blocker / "x.png")], "cannot write"),
             ([str(trained_run / "log.json"), "--labels", "a", "b"], "one name per log"),
             ([str(trained_run / "log.json"), "--out", str(tmp_path / "x.doc")], "name a picture format")]
    open_figures = len(plt.get_fignums())
    for argv, message in cases:
        code, err = run_main(plot_curves, argv, capsys)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not list(tmp_path.glob("*.png")) and not list(tmp_path.glob("*.tmp-*"))
    assert len(plt.get_fignums()) == open_figures  # none kept, also after a failed write


def test_plot_curves_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, plot_curves; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=HERE).returncode == 0
