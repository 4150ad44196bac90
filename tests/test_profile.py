"""pomq-deploy profile: the ORT trace and nsys CSV readers on hand-made input, the nsys command lines, and
a real profile of a small ort-cpu artifact that must leave the artifact loadable."""

import ast
import io
import json
import shutil
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from conftest import tiny_recipe_file, user_error

from pomq_deploy.artifact import MANIFEST, load_artifact, seal, write_json_atomic
from pomq_deploy.cli.main import main
from pomq_deploy.cli.profile_cmd import bench_child_command
from pomq_deploy.profiling import ProfileError
from pomq_deploy.profiling.nsys import parse_kern_sum, profile_command, report_path, stats_command
from pomq_deploy.profiling.ort_trace import summarize

FIXTURES = Path(__file__).parent / "fixtures"


def _run(ts, dur):
    return {"cat": "Session", "name": "model_run", "ph": "X", "ts": ts, "dur": dur, "args": {}}


def _node(name, op, ts, dur, suffix="_kernel_time"):
    return {"cat": "Node", "name": name + suffix, "ph": "X", "ts": ts, "dur": dur, "args": {"op_name": op}}


# three runs in ONNX Runtime's event layout; the first is the warm-up
TRACE = [
    {"cat": "Session", "name": "session_initialization", "ph": "X", "ts": 0, "dur": 90, "args": {}},
    _run(100, 100), _node("q", "QuantizeLinear", 110, 50),  # warm-up: dropped
    _node("stray", "Add", 250, 5),  # between runs: belongs to none
    _run(300, 100), _node("q", "QuantizeLinear", 310, 10), _node("mm", "MatMulIntegerToFloat", 320, 1, "_fence_before"),
    _node("mm", "MatMulIntegerToFloat", 325, 40), _node("q2", "QuantizeLinear", 370, 6),
    _run(500, 120), _node("q", "QuantizeLinear", 510, 14), _node("mm", "MatMulIntegerToFloat", 530, 44),
    _node("q2", "QuantizeLinear", 580, 6),
]


def test_ort_trace_counts_only_timed_kernels():
    p = summarize(TRACE, warmup=1)
    assert (p.runs, p.warmup, p.run_us, p.node_us) == (2, 1, 220.0, 120.0)
    assert [(t.name, t.total_us, t.calls, t.median_us) for t in p.ops] == [("MatMulIntegerToFloat", 84, 2, 42),
                                                                           ("QuantizeLinear", 36, 4, 8)]
    assert [(t.name, t.op_type, t.total_us, t.median_us) for t in p.nodes] == [
        ("mm", "MatMulIntegerToFloat", 84, 42), ("q", "QuantizeLinear", 24, 12), ("q2", "QuantizeLinear", 12, 6)]
    assert p.share(p.ops[0]) == pytest.approx(0.7) and p.ms_per_run(p.ops[0]) == pytest.approx(0.042)
    js = p.to_json(top=1)
    assert js["node_ms_per_run"] == 0.06 and js["run_ms_per_run"] == 0.11 and [n["name"] for n in js["top_nodes"]] == ["mm"]


def test_ort_trace_without_warmup_keeps_every_run():
    p = summarize(TRACE, warmup=0)
    assert p.runs == 3 and p.node_us == 170.0


def test_ort_trace_needs_more_runs_than_warmup():
    with pytest.raises(ValueError, match="3 model runs, not more than the 3 warm-up runs"):
        summarize(TRACE, warmup=3)


def test_nsys_kernel_summary_fixture():
    kernels = parse_kern_sum((FIXTURES / "nsys_kern_sum.csv").read_text())
    assert [(k.percent, k.total_ns, k.instances, k.avg_ns) for k in kernels] == [
        (62.5, 5e6, 600, 8333.3), (25.0, 2e6, 1200, 1666.7), (12.5, 1e6, 600, 1666.7)]
    assert kernels[0].name.startswith("sm90_xmma_gemm_i8i8") and kernels[2].name == "__myl_MulAddSoftmax_0x5f0a"
    assert kernels[1].name.endswith("float const*, float const*)")  # a quoted name with commas stays whole


def test_nsys_output_without_a_kernel_table():
    text = "Processing [r.sqlite] with [cuda_gpu_kern_sum.py]...\nSKIPPED: r.sqlite does not contain CUDA kernel data.\n"
    with pytest.raises(ProfileError, match="no cuda_gpu_kern_sum table \\(Processing"):
        parse_kern_sum(text)
    with pytest.raises(ProfileError, match="no column Instances"):
        parse_kern_sum('"Time (%)","Total Time (ns)","Avg (ns)","Name"\n"100.0","5","5.0","k"\n')


def test_nsys_command_lines(tmp_path):
    base = tmp_path / "profile" / "trt"
    assert report_path(base) == tmp_path / "profile" / "trt.nsys-rep"
    child = bench_child_command(tmp_path, 4, 20)
    assert child == [sys.executable, "-m", "pomq_deploy", "bench", "--artifact", str(tmp_path), "--batch", "4", "--runs", "20"]
    assert profile_command("/opt/nsys", base, child) == [
        "/opt/nsys", "profile", "--trace=cuda,nvtx", "--force-overwrite=true", "-o", str(base), *child]
    assert stats_command("/opt/nsys", report_path(base)) == [
        "/opt/nsys", "stats", "--report", "cuda_gpu_kern_sum", "--format", "csv", "--output", "-", "--force-export=true",
        str(report_path(base))]


@pytest.fixture(scope="module")
def built_once(random_deit_fmnist, tmp_path_factory):
    """A uniform 8/8/8 ort-cpu artifact of the tiny recipe (built once; tests get a copy)."""
    tmp = tmp_path_factory.mktemp("profile")
    recipe = tiny_recipe_file(tmp, random_deit_fmnist)
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["build", "--uniform", "8/8/8", "--recipe", str(recipe), "--out", str(tmp / "eng"),
                     "--limit", "16", "--runs", "2", "--batch", "2", "--json"]) == 0
    return tmp / "eng" / "tiny" / json.loads(out.getvalue())["plan_id"]


@pytest.fixture
def built(built_once, tmp_path):
    return Path(shutil.copytree(built_once, tmp_path / built_once.name))


@pytest.fixture
def trt_built(built):
    """The same directory relabelled as a tensorrt build, sealed again: what the profile command dispatches on."""
    m = json.loads((built / MANIFEST).read_text())
    m["backend"]["name"] = "tensorrt"
    write_json_atomic(seal(m, built), built / MANIFEST)
    return built


def test_profile_ort_artifact(built, capsys):
    files_before = load_artifact(built).manifest.files
    assert main(["profile", "--artifact", str(built), "--batch", "2", "--runs", "3", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert "MatMulIntegerToFloat" in out and "QuantizeLinear" in out and "3 timed runs at batch 2 (10 warm-up runs dropped)" in out
    assert sorted(p.name for p in (built / "profile").iterdir()) == ["ort_profile.json", "summary.json"]
    summary = json.loads((built / "profile" / "summary.json").read_text())
    assert summary["runs"] == 3 and summary["warmup_runs"] == 10 and len(summary["top_nodes"]) == 4
    ops = {o["name"]: o for o in summary["ops"]}
    assert ops["MatMulIntegerToFloat"]["calls"] % 3 == 0 and sum(o["share"] for o in summary["ops"]) == pytest.approx(1, abs=1e-3)
    trace = json.loads((built / "profile" / "ort_profile.json").read_text())
    assert sum(e["name"] == "model_run" for e in trace) == 13  # the raw trace keeps the warm-up runs
    assert load_artifact(built).manifest.files == files_before  # the artifact still verifies


def test_profile_json_to_another_directory(built, tmp_path, capsys):
    out_dir = tmp_path / "elsewhere"
    assert main(["profile", "--artifact", str(built), "--batch", "1", "--runs", "2", "--out", str(out_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads((out_dir / "summary.json").read_text())
    assert printed["batch"] == 1 and printed["runs"] == 2 and printed["trace"] == str(out_dir / "ort_profile.json")
    assert not (built / "profile").exists()


def test_nsys_flag_on_an_ort_artifact(built, capsys):
    assert "drop --nsys" in user_error(["profile", "--artifact", str(built), "--nsys"], capsys)


def test_tensorrt_artifact_needs_nsys_flag(trt_built, capsys):
    assert "needs --nsys" in user_error(["profile", "--artifact", str(trt_built)], capsys)


def test_tensorrt_artifact_without_nsys_installed(trt_built, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    err = user_error(["profile", "--artifact", str(trt_built), "--nsys"], capsys)
    assert "nsys is not on PATH" in err and "Nsight Systems" in err


def _fake_nsys(bin_dir: Path, log: Path) -> None:
    """An ``nsys`` that records its arguments, writes the report on ``profile`` and prints the fixture on ``stats``."""
    bin_dir.mkdir()
    script = bin_dir / "nsys"
    script.write_text(f"""#!{sys.executable}
import sys
from pathlib import Path
with open({str(log)!r}, "a") as f:
    f.write(repr(sys.argv[1:]) + "\\n")
if sys.argv[1] == "profile":
    Path(sys.argv[sys.argv.index("-o") + 1] + ".nsys-rep").write_bytes(b"report")
else:
    print(Path({str(FIXTURES / "nsys_kern_sum.csv")!r}).read_text(), end="")
""")
    script.chmod(0o755)


def test_tensorrt_profile_under_nsys(trt_built, monkeypatch, tmp_path, capsys):
    log = tmp_path / "nsys.log"
    _fake_nsys(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert main(["profile", "--artifact", str(trt_built), "--nsys", "--batch", "4", "--runs", "20", "--top", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    base = trt_built / "profile" / "trt"
    calls = [ast.literal_eval(line) for line in log.read_text().splitlines()]
    assert calls == [profile_command("nsys", base, bench_child_command(trt_built, 4, 20))[1:],
                     stats_command("nsys", report_path(base))[1:]]
    assert [k["instances"] for k in summary["top_kernels"]] == [600, 1200] and summary["total_kernel_ms"] == 8.0
    assert summary["top_kernels"][0]["total_ms"] == 5.0 and summary["top_kernels"][1]["avg_us"] == 1.667
    assert sorted(p.name for p in (trt_built / "profile").iterdir()) == ["nsys_kern_sum.csv", "summary.json", "trt.nsys-rep"]
    load_artifact(trt_built)
    assert main(["profile", "--artifact", str(trt_built), "--nsys", "--top", "3"]) == 0
    table = capsys.readouterr().out
    assert "top 3 CUDA kernels" in table and "__myl_MulAddSoftmax_0x5f0a" in table and "all kernels 8.000 ms" in table
