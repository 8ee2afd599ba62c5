import json

import pytest

from toolchain.pipeline.runs import Manifest, RunDir, RunError, execute, read_manifest, stage_key


def test_key_is_stable_and_sensitive():
    a = stage_key("distill", {"lr": 1e-4, "epochs": 2}, {"generate": "abc"})
    assert a == stage_key("distill", {"epochs": 2, "lr": 1e-4}, {"generate": "abc"})  # order-free
    assert a != stage_key("distill", {"lr": 2e-4, "epochs": 2}, {"generate": "abc"})
    assert a != stage_key("distill", {"lr": 1e-4, "epochs": 2}, {"generate": "abd"})
    # speed-only settings do not change what a stage produces, so not its key
    assert a == stage_key("distill", {"lr": 1e-4, "epochs": 2, "threads": 4}, {"generate": "abc"})
    # an option left unset is the same as an option that did not exist yet; set, it counts
    assert a == stage_key("distill", {"lr": 1e-4, "epochs": 2, "stop": [], "template": None}, {"generate": "abc"})
    assert a != stage_key("distill", {"lr": 1e-4, "epochs": 2, "stop": ["\n"]}, {"generate": "abc"})
    assert a != stage_key("distill", {"lr": 1e-4, "epochs": 2, "alpha": 0}, {"generate": "abc"})


def _stage(calls):
    def fn(cfg, inputs, out):
        calls.append(out)
        (out / "data.txt").write_text("hello")
        (out / ".resume").mkdir(exist_ok=True)
        (out / ".resume" / "ckpt").write_text("scratch")
        return Manifest(metrics={"n": 1}, seeds={"s": 0})
    return fn


def test_execute_publishes_atomically_and_skips(tmp_path):
    run, calls = RunDir(tmp_path / "r"), []
    d1 = execute(run, "demo", _stage(calls), None, {"x": 1}, {"in": ("sha", None)})
    assert (d1 / "manifest.json").is_file() and not (d1 / ".resume").exists()
    m = read_manifest(d1)
    assert m["files"]["data.txt"]["bytes"] == 5 and m["metrics"] == {"n": 1}
    assert not any((tmp_path / "r" / ".work").iterdir())
    d2 = execute(run, "demo", _stage(calls), None, {"x": 1}, {"in": ("sha", None)})
    assert d1 == d2 and len(calls) == 1  # same key: skipped
    d3 = execute(run, "demo", _stage(calls), None, {"x": 2}, {"in": ("sha", None)})
    assert d3 != d1 and len(calls) == 2


def test_tampered_output_is_refused(tmp_path):
    run = RunDir(tmp_path / "r")
    d = execute(run, "demo", _stage([]), None, {}, {})
    (d / "data.txt").write_text("HELLO")
    with pytest.raises(RunError, match="sha256 does not match"):
        read_manifest(d)
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match="corrupt manifest"):
        read_manifest(d)


def test_failed_stage_leaves_no_finished_dir(tmp_path):
    run = RunDir(tmp_path / "r")

    def boom(cfg, inputs, out):
        (out / "half.txt").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        execute(run, "demo", boom, None, {}, {})
    assert not list((tmp_path / "r").glob("demo-*"))
    work = list((tmp_path / "r" / ".work").glob("demo-*"))
    assert work and (work[0] / "half.txt").read_text() == "partial"  # kept for resume
    assert json.loads((work[0] / "stage.json").read_text())["stage"] == "demo"


def test_second_process_on_the_same_stage_is_refused(tmp_path):
    import subprocess
    import sys

    run = RunDir(tmp_path / "r")
    key = stage_key("demo", {}, {})
    lock = tmp_path / "r" / ".work" / f"demo-{key[:12]}.lock"
    lock.parent.mkdir(parents=True)
    lock.write_text("4242")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX);"
         " print('held', flush=True); time.sleep(60)", str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunError, match=r"already running \(pid 4242\)"):
            execute(run, "demo", _stage([]), None, {}, {})
    finally:
        holder.kill()
        holder.wait()
    assert execute(run, "demo", _stage([]), None, {}, {}).is_dir()  # free again: runs


def test_a_json_file_killed_mid_write_keeps_its_old_content(tmp_path, monkeypatch):
    """Resume files (eval's per-model results, export's per-file checks) are written then renamed: a kill in the
    middle of a write leaves the previous file whole, never half a JSON document the next run cannot read."""
    import json

    from toolchain.pipeline import runs

    path = tmp_path / "teacher.json"
    runs.write_json_atomic(path, {"metrics": {"a": 1}})

    def dying(obj, fh, **kw):
        fh.write('{"metrics": {"a"')  # half of it, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.json, "dump", dying)
    with pytest.raises(KeyboardInterrupt):
        runs.write_json_atomic(path, {"metrics": {"a": 2}})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"metrics": {"a": 1}}
