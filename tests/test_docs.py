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
    for md in ("scaling.md", "sm90_before_after.md"):
        (out / md).unlink()
    assert bench.main(["scaling", "--tables-only", "--csv", str(out / "scaling.csv")]) == 0
    assert perf_report.main(["--tables-only", "--out", str(out)]) == 0
    for md in ("scaling.md", "sm90_before_after.md"):
        assert (out / md).read_text() == (doc_tables.ROOT / "bench_results" / md).read_text(), md
