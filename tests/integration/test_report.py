"""bench, report and sweep on the CI recipe: the numbers are there and consistent, the report opens in a real
headless browser, and a sweep adds its students and Pareto front."""

import json
from pathlib import Path

import pytest

from tests.conftest import distillery, recipe_copy

pytestmark = pytest.mark.integration


def _bench(runs: Path) -> dict:
    return json.loads((sorted((runs / "ci").glob("bench-*"))[0] / "bench.json").read_text())


def test_bench_compares_teacher_and_student_at_the_same_quant(ci_run):
    _, runs, _ = ci_run
    b = _bench(runs)
    assert b["quant"] == "q8_0" and b["files"]["teacher"].endswith("-q8_0.gguf")  # the teacher rebuilt at q8_0
    for role in ("teacher", "student"):
        s = b["summary"][role]
        assert len(s["decode_tps"]["runs"]) == b["repeats"] == 2
        assert s["decode_tps"]["min"] <= s["decode_tps"]["median"] <= s["decode_tps"]["max"]
        assert s["peak_rss_bytes"]["median"] > 50e6 and s["ttft_ms"]["median"] > 0
    r = b["ratios"]
    assert r["decode_tps"] == pytest.approx(b["summary"]["student"]["decode_tps"]["median"]
                                            / b["summary"]["teacher"]["decode_tps"]["median"])
    assert r["size"] < 0.6  # 8 of 30 layers
    usd = b["usd_per_1m_output_tokens"]
    assert usd["student"] == pytest.approx(0.10 / 3600 * b["summary"]["student"]["seconds_per_output_token"]["median"] * 1e6)
    assert r["student_cost_vs_api"] == pytest.approx(usd["student"] / 10.0)
    assert b["break_even"]["one_time_seconds"] > 0 and b["break_even"]["output_tokens"] > 0
    assert 0 < b["served"]["decode_ratio_vs_raw"] < 5
    # A busy server: 4 requests decoding together; $ per 1M at full load from that throughput.
    ld = b["loaded"]
    assert ld["concurrency"] == 4
    for role in ("teacher", "student"):
        tps = b["summary"][role]["loaded_tps"]["median"]
        assert tps > 0 and all(run["loaded"]["output_tokens"] > 0 for run in b["runs"][role])
        assert ld["usd_per_1m_output_tokens"][role] == pytest.approx(0.10 / 3600 / tps * 1e6)
    # $ per 1,000 calls per task at its median lengths: input and output priced separately; the student's wall time
    pc = b["per_call"]
    assert pc["all"]["calls"] == b["prompts"] and sum(t["calls"] for k, t in pc.items() if k != "all") == b["prompts"]
    for t in pc.values():
        assert t["api_usd_per_1k"] == pytest.approx((t["prompt_tokens"] * 2.5 + t["answer_tokens"] * 10.0) / 1e6 * 1000)
        assert t["student_usd_per_1k"] == pytest.approx(t["student_wall_s"] * 0.10 / 3600 * 1000)
        assert t["ratio"] == pytest.approx(t["api_usd_per_1k"] / t["student_usd_per_1k"])
    assert pc["all"]["student_usd_per_1k_loaded"] > 0
    assert all(t["student_usd_per_1k_loaded"] is None for k, t in pc.items() if k != "all")  # only the mix shares
    assert "API $ per 1,000 calls" in (sorted((runs / "ci").glob("bench-*"))[0] / "bench.md").read_text()
    assert {(f["format"], f["variant"]) for f in b["per_file"]} == {
        ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "iq4_nl"), ("onnx", "fp32"), ("onnx", "int8")}


def test_report_html_renders_in_headless_chromium(ci_run, tmp_path):
    import numpy as np
    from PIL import Image

    from toolchain.render.report import screenshot

    recipe, runs, proc = ci_run
    page = runs / "ci" / "report" / "report.html"
    assert str(page) in proc.stdout  # `distillery run` wrote it
    assert str(page) in distillery("report", str(recipe), "--runs", str(runs)).stdout  # and `distillery report` does
    text = page.read_text()
    # quality vs speed, cost, retention per task, and the cascade (calls kept vs combined retention, priced)
    assert text.count("data:image/png;base64,") == 4 and "http" not in text.split("<body>")[1].split("Teacher")[0]
    for heading in ("Speed and cost", "Quality (lm-eval", "Exported files", "Cascade: the student answers",
                    "$ per 1,000 calls (API alone)"):
        assert heading in text
    png = screenshot(page, tmp_path / "report.png", height=2400)
    image = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
    assert image.shape == (2400, 1200)
    assert image.std() > 20  # text, tables and charts, not a blank page
    assert (image < 128).mean() > 0.01


def test_sweep_adds_students_and_a_pareto_front(ci_run, tmp_path):
    recipe, runs, _ = ci_run
    proc = distillery("sweep", str(recipe), "--runs", str(runs), "--shapes", "4,4x768", timeout=1800)
    sweep = json.loads((runs / "ci" / "sweep.json").read_text())
    shapes = [(s["keep_layers"], s["intermediate_size"]) for s in sweep["students"]]
    assert shapes == [(4, None), (4, 768)]  # depth alone, then depth and half the MLP channels
    deep, narrow = sweep["students"]
    assert narrow["parameters"] < deep["parameters"] and narrow["bytes"] < deep["bytes"]
    assert all(s["decode_tps"] > 0 and s["validation_gold"] is None for s in sweep["students"])
    html = (runs / "ci" / "report" / "report.html").read_text()
    assert "Sweep: layers kept" in html and "Pareto" in html and str(runs / "ci" / "report" / "report.html") in proc.stdout
    assert "<td>4</td><td>768</td><td>all</td>" in html  # the narrow student's row names its width
    assert "drawn on the held-out gold it also reports" in html

    # with distill.validation each student is also scored on training prompts kept out of its training, and the
    # front is drawn on those (the same run directory: the teacher's answers are reused)
    scored = recipe_copy(tmp_path, distill__validation={"fraction": 0.25})
    distillery("sweep", str(scored), "--runs", str(runs), "--shapes", "4", timeout=1800)
    sweep = json.loads((runs / "ci" / "sweep.json").read_text())
    (student,) = sweep["students"]
    assert 0.0 <= student["validation_gold"] <= 1.0
    distill_dir = Path(student["dirs"]["distill"])
    rows = [json.loads(x) for x in (distill_dir / "validation.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["kept"] and rows[0]["gold"] == student["validation_gold"]
    distillery("report", str(recipe), "--runs", str(runs))  # the recipe's own student, with this sweep
    assert "drawn on the validation slice" in (runs / "ci" / "report" / "report.html").read_text()
    bad = distillery("sweep", str(recipe), "--runs", str(runs), "--keep-layers", "4,x", check=False)
    assert bad.returncode == 2 and "--keep-layers" in bad.stderr
    bad = distillery("sweep", str(recipe), "--runs", str(runs), "--shapes", "4x7040", check=False)
    assert bad.returncode == 2 and "student.intermediate_size: 7040 is not fewer than the teacher's 1536" in bad.stderr
