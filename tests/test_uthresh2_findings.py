"""One calibration, one threshold text. `calibrate` and `run` printed a threshold at 6 significant digits
(`threshold 4.3435`), the report with the digits its listed risks needed (`risk > 4.343495`): one calibration read
as two numbers. audit.text.threshold_text is now the only place a threshold becomes text, and every command prints
the digits that read back as the threshold itself. Tiny model, CPU."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from helpers import prompts_file


def test_threshold_text_reads_back_as_the_threshold():
    from audit.text import threshold_text

    assert threshold_text(4.343418926861595) == "4.343418926861595"  # .6g said 4.34342
    assert threshold_text(1.7935721) == "1.7935721" and threshold_text(15.345712) == "15.345712"
    assert threshold_text(0.1) == "0.1" and threshold_text(4.5) == "4.5" and threshold_text(1.0) == "1"
    assert threshold_text(141.28571428571428) == "141.28571428571428" and threshold_text(1e-7) == "1e-07"
    assert threshold_text(float("inf")) == "inf" and threshold_text("x") == "'x'"
    # two thresholds a float apart never print alike
    assert threshold_text(1.0 + 2 ** -52) == "1.0000000000000002"


def test_one_calibration_prints_one_threshold_text_in_calibrate_run_report_and_diff(tmp_path, tiny_model_dir):
    from audit.cli import app

    def invoke(*args):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res

    src = prompts_file(tmp_path / "p.txt", 24, seed=5)
    model = str(tiny_model_dir)
    invoke("run", src, "--model", model, "--out", tmp_path / "ref", "--device", "cpu")
    said = {}
    for fpr in ("0.25", "0.5"):
        res = invoke("calibrate", tmp_path / "ref", "--fpr", fpr, "-o", tmp_path / f"c{fpr}.json")
        threshold = json.loads((tmp_path / f"c{fpr}.json").read_text())["threshold"]
        said[fpr] = repr(threshold)  # every digit of the float: no risk above it prints equal to it
        assert len(said[fpr].replace(".", "").lstrip("0")) > 6, said  # more than .6g gave
        assert f"memaudit: threshold {said[fpr]} at FPR {fpr} from 24 reference prompts" in res.stderr
        res = invoke("run", src, "--model", model, "--out", tmp_path / f"r{fpr}", "--device", "cpu",
                     "--calibration", tmp_path / f"c{fpr}.json")
        assert re.search(rf"memaudit: \d+ rows flagged \(risk > {re.escape(said[fpr])}\)", res.stderr), res.stderr
        res = invoke("run", src, "--model", model, "--out", tmp_path / "dry", "--device", "cpu",
                     "--calibration", tmp_path / f"c{fpr}.json", "--dry-run")
        assert f"flags risk > {said[fpr]} at FPR {fpr} " in res.stdout
        report = invoke("report", tmp_path / f"r{fpr}")
        for fmt in ("md", "html", "json"):
            invoke("report", tmp_path / f"r{fpr}", "--format", fmt)
        md = (tmp_path / f"r{fpr}" / "report.md").read_text()
        page = (tmp_path / f"r{fpr}" / "report.html").read_text()
        assert f"flagged: risk &gt; {said[fpr]}." in md and f"risk &gt; {said[fpr]}" in page
        assert f"risk > {said[fpr]}" in " ".join(report.stdout.split())
        assert json.loads((tmp_path / f"r{fpr}" / "report.json").read_text())["calibration"]["threshold"] \
            == float(said[fpr])
    res = invoke("diff", tmp_path / "r0.25", tmp_path / "r0.5")
    assert (f"the runs flagged with different calibrations (risk > {said['0.25']} at FPR 0.25 vs risk > "
            f"{said['0.5']} at FPR 0.5)") in " ".join((res.stdout + res.stderr).split())
