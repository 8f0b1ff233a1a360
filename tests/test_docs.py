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


def _suite(out, env: dict, kernels: list[dict], e2e: list[dict]):
    """A scripts/gpu_suite.sh OUT folder with rows as its benchmarks write them (append_csv)."""
    import json

    from roberta_ds.benchmarks.common import append_csv

    (out / "env").mkdir(parents=True)
    (out / "env" / "env.json").write_text(json.dumps(env))
    (out / "env" / "DONE").touch()
    (out / "SUMMARY.md").write_text("# GPU suite\n")
    if kernels:
        append_csv(out / "kernels" / "kernels.csv", kernels)
    if e2e:
        append_csv(out / "e2e_zero1" / "base.csv", e2e)
        (out / "e2e_zero1" / "log.txt").write_text("ran\n")


def test_a_gpu_suite_is_published_whole_and_gives_the_headline_its_gpu_row(tmp_path):
    """`doc_tables --gpu-suite OUT`: the suite's results land in bench_results/gpu/ (markers left out),
    README's GPU row is rendered from them, and a later suite replaces the earlier one whole."""
    import shutil

    root = tmp_path / "repo"
    shutil.copytree(doc_tables.ROOT / "bench_results", root / "bench_results")
    shutil.rmtree(root / "bench_results" / "gpu", ignore_errors=True)
    (root / "README.md").write_text(f"<!-- include: {doc_tables.HEADLINE} -->\n<!-- end include -->\n")
    doc_tables.sync(root)
    assert doc_tables.GPU_ROW[1] in (root / "README.md").read_text()  # nothing measured yet

    env = {"device": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc1234",
           "date": "2026-12-04T00:00:00Z", "dry_run": False, "gpus": 1}  # fmt: skip
    common = {"date": env["date"], "mode": "fwd+bwd"}
    att = "base B32 S512 H12 D64 pad10%"
    kernels = [
        {**common, "kernel": "attention", "shape": att, "impl": "triton", "ms": 1.2, "tflops": 301.4},
        {**common, "kernel": "attention", "shape": att, "impl": "sdpa-flash", "ms": 1.5, "tflops": 241.0},
        {**common, "kernel": "attention", "shape": att, "impl": "sdpa-cudnn", "ms": 1.4, "tflops": 258.3},
        {**common, "kernel": "attention", "shape": att, "impl": "eager", "ms": 6.0, "tflops": 60.0},
        {**common, "kernel": "attention", "shape": "base B128 S128 H12 D64 pad10%", "impl": "sdpa-flash",
         "ms": 0.1, "tflops": 1.0},  # another shape: not the headline's
        {**common, "kernel": "linear_cross_entropy", "shape": "base N2457 D768 V50265", "impl": "eager",
         "ms": 9.0, "speedup_vs_eager": 1.0},
        {**common, "kernel": "linear_cross_entropy", "shape": "base N2457 D768 V50265",
         "impl": "triton-fused", "ms": 2.5, "speedup_vs_eager": 3.6},
    ]  # fmt: skip
    e2e = [
        {"date": env["date"], "impl": "ours-triton", "preset": "base", "seq_len": 512,
         "tokens_per_s": 123456.0, "mfu": 0.4649},
        {"date": env["date"], "impl": "hf-sdpa", "preset": "base", "seq_len": 512, "tokens_per_s": 61728.0,
         "mfu": 0.2325},
        {"date": env["date"], "impl": "hf-sdpa", "preset": "base", "seq_len": 128, "tokens_per_s": 1.0},
    ]  # fmt: skip
    first = tmp_path / "suite1"
    _suite(first, env, kernels, e2e)
    dest = doc_tables.publish_gpu_suite(first, root)
    assert dest == root / doc_tables.GPU_DIR
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == ["SUMMARY.md", "e2e_zero1/base.csv", "e2e_zero1/log.txt", "env/env.json",
                      "kernels/kernels.csv"]  # fmt: skip
    readme = (root / "README.md").read_text()
    assert doc_tables.GPU_ROW[1] not in readme
    assert "measured on NVIDIA H200, bf16 (torch 2.11.0, triton 3.6.0, commit abc1234)" in readme
    # 1.4 ms (cudnn, the fastest peer) / 1.2 ms = 1.1667; 123456 / 61728 = 2.00
    assert "attention fwd+bwd (base, seq 512, 10% padding) 301 TFLOP/s, 1.17x the fastest SDPA backend " \
           "(sdpa-cudnn)" in readme  # fmt: skip
    assert "fused decoder + cross-entropy 3.60x full logits + F.cross_entropy" in readme
    assert "base at seq 512, ZeRO-1: 123K tokens/s, 46% MFU, 2.00x transformers' SDPA model" in readme

    second = tmp_path / "suite2"  # a later suite that got no kernel results: the old ones go with it
    _suite(second, {**env, "commit": "def5678"}, [], e2e)
    dest.rename(dest.with_name(".gpu.old"))  # as if a publish had been killed between its renames
    with pytest.raises(doc_tables.SuiteError):
        doc_tables.publish_gpu_suite(tmp_path / "not-a-suite", root)
    assert (dest / "kernels" / "kernels.csv").is_file()  # the previous suite is back, whole
    doc_tables.publish_gpu_suite(second, root)
    assert not (dest / "kernels").exists() and "commit def5678" in (root / "README.md").read_text()
    assert "TFLOP/s" not in (root / "README.md").read_text()


@pytest.mark.parametrize("env", [{"dry_run": True, "gpus": 0}, {"dry_run": False, "gpus": 0}, None])
def test_a_dry_run_or_gpu_less_suite_is_refused_and_nothing_is_published(tmp_path, env, capsys):
    out = tmp_path / "suite"
    if env is None:
        out.mkdir()  # not a suite's folder at all
        want = "no env/env.json"
    else:
        _suite(out, {"device": "CPU x2", "torch": "2.13", "triton": "3.9", "commit": "x", **env}, [], [])
        want = "a dry run on CPU x2" if env["dry_run"] else "a run without a GPU on CPU x2"
    with pytest.raises(doc_tables.SuiteError, match=want):
        doc_tables.publish_gpu_suite(out, tmp_path)
    assert not (tmp_path / doc_tables.GPU_DIR).exists()
    assert doc_tables.main(["--gpu-suite", str(out)]) == 2
    assert want in capsys.readouterr().err
