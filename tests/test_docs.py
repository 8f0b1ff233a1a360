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
