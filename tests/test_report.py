"""`make report QUICK=1`: every section measured, the page, its tables and figures written, and the figures
in report.json tied to measurements of this run (checked here against independent measurements of the
same quantities)."""

import html
import json
import re
import struct
import subprocess
import sys

import pytest

from ambert.report.page import fmt

SECTIONS = ("quantization", "baselines", "compression", "pooling", "parallelism", "acceleration")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    run = subprocess.run([sys.executable, "-m", "ambert.report", "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return out, json.loads((out / "report.json").read_text())


def _png_size(path):
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_every_section_is_measured_and_has_its_figure(quick_report):
    out, rep = quick_report
    assert list(rep["sections"]) == list(SECTIONS)
    for key, sec in rep["sections"].items():
        assert not any("failed" in a for a in sec["absent"]), (key, sec["absent"])
        assert sec["tables"] and all(t["rows"] for t in sec["tables"]), key
        assert sec["figures"], key
        for fig in sec["figures"]:
            width, height = _png_size(out / fig["file"])
            assert width >= 400 and height >= 200, fig
    assert rep["quick"] and rep["machine"]["cores"] >= 1 and rep["machine"]["torch"]


def test_the_page_is_offline_and_shows_every_figure_and_table(quick_report):
    out, rep = quick_report
    page = (out / "index.html").read_text()
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    linked = set(re.findall(r'<img src="([^"]+)"', page))
    assert linked == {f["file"] for s in rep["sections"].values() for f in s["figures"]}
    assert linked == {p.name for p in out.glob("*.png")}
    for sec in rep["sections"].values():
        for t in sec["tables"]:
            assert f"<h3>{html.escape(t['title'])}</h3>" in page


def test_the_markdown_tables_are_report_json_formatted(quick_report):
    out, rep = quick_report
    md = (out / "report.md").read_text()
    for sec in rep["sections"].values():
        for t in sec["tables"]:
            for row in t["rows"]:
                line = "| " + " | ".join(fmt(v, f) for v, f in zip(row, t["formats"])) + " |"
                assert line in md, line
    for h in rep["headline"].values():
        assert f"| {h['what']} | {fmt(h['value'], h['format'])} |" in md


def _table(rep, section, title_start):
    return next(t for t in rep["sections"][section]["tables"] if t["title"].startswith(title_start))


def test_the_figures_are_this_runs_measurements(quick_report, minilm, eval_sentences):
    """Quantities measured again here, independently, agree with the report's."""
    from ambert.sw.quant.fidelity import measure
    from ambert.sw.quant.hf import bundled_model_dir
    _, rep = quick_report
    qm, model, tok = minilm
    # bytes on disk
    sizes = _table(rep, "quantization", "Model bytes")
    assert sizes["rows"][0][1] == (bundled_model_dir() / "model.safetensors").stat().st_size / 2**20
    # fidelity of the quantized model on the quick run's 24 sentences
    fid = measure(model.eval(), qm, tok, eval_sentences[:24])
    assert sizes["rows"][1][3:6] == [fid.mean_cos, fid.min_cos, float(fid.spearman)]
    sqnr = _table(rep, "quantization", "SQNR")
    assert [row[1:] for row in sqnr["rows"]] == [[float(r[n]) for n in sqnr["columns"][1:]] for r in fid.sqnr]
    # timings vary from run to run: each contender's is its own, and batch 32 costs more than batch 1
    times = _table(rep, "baselines", "Wall time")
    assert len({row[1] for row in times["rows"]}) == len(times["rows"])
    assert all(row[3] > row[1] > 0 for row in times["rows"])
    # the dense row of the pruning sweep: the device's cycles for the same sequence
    from ambert.report.context import Context, Settings
    from ambert.report.sections import _device_cycles
    ctx = Context(Settings.quick()).load()
    try:
        cycles = _device_cycles(ctx, qm, ctx.batch(1)).cycles
    finally:
        ctx.close()
    assert _table(rep, "compression", "Structured pruning")["rows"][0][4] == cycles


def test_a_section_that_fails_is_named_on_the_page_and_in_the_exit_status(tmp_path, monkeypatch):
    from ambert.report import __main__ as main
    from ambert.report import sections

    def broken(ctx, sec, step):
        raise RuntimeError("the device vanished")

    monkeypatch.setattr(main, "SECTIONS", [("quantization", "Quantization", lambda ctx, sec, step: {}),
                                           ("parallelism", "Parallelism", broken)])
    monkeypatch.setattr(main.Context, "load", lambda self: self)
    assert sections.SECTIONS                              # the real list is untouched
    assert main.main(["--quick", "--out", str(tmp_path)]) == 1
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["sections"]["parallelism"]["absent"] == ["this section failed: RuntimeError: the device vanished"]
    assert "the device vanished" in (tmp_path / "index.html").read_text()


def test_an_unknown_section_is_refused_by_name(capsys):
    from ambert.report.__main__ import main
    with pytest.raises(SystemExit) as e:
        main(["--only", "sharding"])
    assert e.value.code == 2 and "unknown section(s) sharding" in capsys.readouterr().err
