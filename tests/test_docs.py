"""The docs quote benchmark outputs by inclusion (roberta_ds/benchmarks/doc_tables.py)."""

import pytest

from roberta_ds.benchmarks import doc_tables


def test_docs_quote_the_benchmark_outputs_as_written():
    stale = doc_tables.sync(check=True)
    assert not stale, f"run python -m roberta_ds.benchmarks.doc_tables: {stale} quote older outputs"


def test_an_include_region_takes_its_file_and_a_check_finds_it_stale(tmp_path):
    (tmp_path / "bench_results").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "bench_results" / "x.md").write_text("| a |\n|---|\n| 2 |\n")
    before = "intro\n<!-- include: bench_results/x.md -->\n| a |\n|---|\n| 1 |\n<!-- end include -->\nafter\n"
    (tmp_path / "docs" / "d.md").write_text(before)
    assert doc_tables.sync(tmp_path, check=True) == [tmp_path / "docs" / "d.md"]
    assert (tmp_path / "docs" / "d.md").read_text() == before  # a check writes nothing
    assert doc_tables.sync(tmp_path) == [tmp_path / "docs" / "d.md"]
    assert (tmp_path / "docs" / "d.md").read_text() == before.replace("| 1 |", "| 2 |")
    assert doc_tables.sync(tmp_path, check=True) == []
    (tmp_path / "README.md").write_text("<!-- include: bench_results/gone.md -->\n<!-- end include -->\n")
    with pytest.raises(doc_tables.IncludeError, match="README.md: includes bench_results/gone.md"):
        doc_tables.sync(tmp_path)


def test_a_table_is_rendered_with_figures_rounded_half_up_as_written():
    assert doc_tables.table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |\n"
    assert [doc_tables.half_up(v, 1) for v in (38.15, "21.55", 0.05)] == ["38.2", "21.6", "0.1"]
    assert doc_tables.half_up("0.345", 0, 100) == "35" and doc_tables.half_up(44634, 0, "0.001") == "45"


def test_committed_tables_are_what_their_benchmarks_render_from_the_committed_outputs(tmp_path):
    """No hand edit: rendering again from the committed CSV / JSON (--tables-only, in a copy) gives the
    committed .md byte for byte."""
    import shutil

    from kernel_tools import perf_report
    from roberta_ds import bench

    out = tmp_path / "bench_results"
    shutil.copytree(doc_tables.ROOT / "bench_results", out)
    for md in ("scaling.md", "sm90_before_after.md", "sm90_before_after.json"):
        (out / md).unlink()
    assert bench.main(["scaling", "--tables-only", "--csv", str(out / "scaling.csv")]) == 0
    assert perf_report.main(["--tables-only", "--out", str(out)]) == 0
    for md in ("scaling.md", "sm90_before_after.md", "sm90_before_after.json"):
        assert (out / md).read_text() == (doc_tables.ROOT / "bench_results" / md).read_text(), md


def test_the_headline_table_is_rendered_from_the_latest_outputs(tmp_path):
    """README's headline figures come from the benchmarks' outputs: the same outputs give the committed
    table, a new run's figure replaces the old one, and a missing output drops its row."""
    import csv
    import shutil

    shutil.copytree(doc_tables.ROOT / "bench_results", tmp_path / "bench_results")
    (tmp_path / "README.md").write_text(f"<!-- include: {doc_tables.HEADLINE} -->\n<!-- end include -->\n")
    doc_tables.sync(tmp_path)
    committed = (doc_tables.ROOT / doc_tables.HEADLINE).read_text()
    assert (tmp_path / doc_tables.HEADLINE).read_text() == committed
    assert committed in (tmp_path / "README.md").read_text()

    path = tmp_path / "bench_results" / "data_100mb.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    new = [dict(r, date="2099-01-01T00:00:00Z") for r in rows if r["date"] == rows[-1]["date"]]
    next(r for r in new if r["method"].endswith(", 1 worker(s)"))["tokens_per_s"] = "1234567.8"
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=list(rows[0])).writerows(new)
    (tmp_path / "bench_results" / "scaling.csv").unlink()
    assert doc_tables.sync(tmp_path, check=True) == [tmp_path / doc_tables.HEADLINE, tmp_path / "README.md"]
    doc_tables.sync(tmp_path)
    readme = (tmp_path / "README.md").read_text()
    assert "1235K tokens/s on 1 worker" in readme and "ZeRO-1" not in readme


def test_the_quickstart_figures_are_what_its_bench_renders_from_the_committed_json():
    """README's Quickstart figures and tables are bench_results/quickstart.md: what
    `python -m roberta_ds.bench quickstart --tables-only` renders from the committed JSON."""
    import json

    from roberta_ds.benchmarks import quickstart

    res = doc_tables.ROOT / "bench_results"
    assert (
        quickstart.markdown(json.loads((res / "quickstart.json").read_text()))
        == (res / "quickstart.md").read_text()
    )
    assert "<!-- include: bench_results/quickstart.md -->" in (doc_tables.ROOT / "README.md").read_text()
