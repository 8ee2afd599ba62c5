"""Run directories, stage keys, manifests, atomic publish and resume.

    runs/<recipe>/<stage>-<key12>/      a finished stage: its files + manifest.json (written last)
    runs/<recipe>/.work/<stage>-<key12>/ the same stage while it runs; long stages checkpoint here

key = sha256(canonical JSON of the stage's config, the sha256 digests of its inputs, the toolchain version).
Same inputs give the same key, so the stage is skipped; change one field and only that stage and the ones
after it get new keys. A directory is only ever used through a manifest whose file hashes still match.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from toolchain import __version__
from toolchain.models.references import file_sha256
from toolchain.recipe import Recipe
from toolchain.ui import console, is_main

MANIFEST = "manifest.json"
RESUME_DIR = ".resume"  # stage-private checkpoints; deleted before publish, never hashed

# Fields that change how fast a stage runs, not what it produces: they do not enter the key. Nor do unset
# fields (None or empty): an option added later, left off, leaves earlier runs' keys as they were.
NON_SEMANTIC = {"threads", "checkpoint_every", "concurrency", "requests_per_minute", "timeout_s", "max_retries",
                "api_key_env", "judge_api_key_env", "usd_per_1m_input", "usd_per_1m_output"}


class RunError(RuntimeError):
    """A run directory or manifest that cannot be trusted (missing, corrupt, tampered)."""


@dataclass
class Manifest:
    """What a stage reports about its outputs; runs.publish adds files, hashes, key, versions, timings."""

    metrics: dict[str, Any] = field(default_factory=dict)
    seeds: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def semantic_config(cfg: Any) -> Any:
    """What of a stage config enters its key: no speed-only fields, no unset ones."""
    if isinstance(cfg, dict):
        return {k: semantic_config(v) for k, v in cfg.items() if k not in NON_SEMANTIC and v not in (None, [], {})}
    if isinstance(cfg, list):
        return [semantic_config(v) for v in cfg]
    return cfg


def stage_key(stage: str, config: dict, inputs: dict[str, str]) -> str:
    payload = {"stage": stage, "config": semantic_config(config), "inputs": inputs, "toolchain": __version__}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


def stage_dir_name(stage: str, key: str) -> str:
    return f"{stage}-{key[:12]}"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "distillery": __version__}
    for pkg in ("torch", "transformers", "peft", "accelerate", "llama_cpp_python", "gguf"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _hash_files(root: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MANIFEST and RESUME_DIR not in p.relative_to(root).parts:
            files[p.relative_to(root).as_posix()] = {"sha256": file_sha256(p), "bytes": p.stat().st_size}
    return files


def digest_of(files: dict[str, dict[str, Any]]) -> str:
    """One sha256 for a stage's outputs: what downstream keys depend on."""
    return hashlib.sha256(canonical({k: v["sha256"] for k, v in files.items()}).encode()).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON written to a temporary file, flushed, then renamed over ``path``: a kill mid-write leaves the old file
    (or none), never half of one that would block the next run."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_manifest(stage_path: Path, verify: bool = True) -> dict[str, Any]:
    """Load a finished stage's manifest; with verify, re-hash every file and refuse any mismatch."""
    mpath = stage_path / MANIFEST
    if not mpath.is_file():
        raise RunError(f"{stage_path}: no {MANIFEST} (the stage never finished)")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise RunError(f"{mpath}: corrupt manifest ({err})") from None
    if verify:
        for rel, info in files.items():
            p = stage_path / rel
            if not p.is_file():
                raise RunError(f"{p}: listed in the manifest but missing")
            if p.stat().st_size < info["bytes"]:
                raise RunError(f"{p}: truncated ({p.stat().st_size} of the {info['bytes']} bytes its manifest lists)")
            if p.stat().st_size != info["bytes"] or file_sha256(p) != info["sha256"]:
                raise RunError(f"{p}: sha256 does not match its manifest (file changed after the stage finished)")
    return manifest


@dataclass(frozen=True)
class RunDir:
    """runs/<recipe-name>/ for one recipe."""

    root: Path

    @classmethod
    def for_recipe(cls, runs_root: str | Path, name: str) -> "RunDir":
        return cls(Path(runs_root) / name)

    def final(self, stage: str, key: str) -> Path:
        return self.root / stage_dir_name(stage, key)

    def work(self, stage: str, key: str) -> Path:
        return self.root / ".work" / stage_dir_name(stage, key)

    def done(self, stage: str, key: str) -> Path | None:
        p = self.final(stage, key)
        return p if (p / MANIFEST).is_file() else None

    def others(self, stage: str, key: str) -> list[Path]:
        """Finished directories of this stage made with other keys (stale results)."""
        return sorted(
            p for p in self.root.glob(f"{stage}-*") if p.is_dir() and p.name != stage_dir_name(stage, key)
        )


StageFn = Callable[[Any, dict[str, Path], Path], Manifest]


def execute(
    run: RunDir,
    stage: str,
    fn: StageFn,
    cfg: Any,
    config: dict,
    inputs: dict[str, tuple[str, Path | None]],
    licence: dict | None = None,
    force: bool = False,
) -> Path:
    """Run one stage unless its key is already done; publish atomically; return the finished directory.

    inputs maps a name to (sha256 digest, path or None). Only digests enter the key; paths are what the stage
    reads. A stage's ``.resume/`` checkpoints in the work directory survive a kill and are deleted on publish.
    """

    key = stage_key(stage, config, {k: v[0] for k, v in inputs.items()})
    final = run.final(stage, key)
    if not force and run.done(stage, key):
        read_manifest(final)  # never trust a finished dir blindly
        console.print(f"[green]✓[/] {stage}: up to date ({final})")
        return final
    work = run.work(stage, key)
    work.mkdir(parents=True, exist_ok=True)
    if not is_main():
        # One of several training processes (accelerate): it trains alongside rank 0, which alone holds the
        # lock, writes the files and publishes.
        fn(cfg, {k: v[1] for k, v in inputs.items() if v[1] is not None}, work)
        return final
    with _exclusive(run.root / ".work" / f"{stage_dir_name(stage, key)}.lock", stage):
        if final.exists():
            shutil.rmtree(final)
        return _run_and_publish(run, stage, fn, cfg, config, inputs, licence, key, work, final)


class _exclusive:
    """An advisory lock per stage key: two processes must never append to the same work directory."""

    def __init__(self, path: Path, stage: str):
        self.path, self.stage, self.fh = path, stage, None

    def __enter__(self):
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.fh.seek(0)
            pid = self.fh.read().strip() or "?"
            self.fh.close()
            raise RunError(f"{self.stage} with these settings is already running (pid {pid}); wait for it to finish")
        self.fh.seek(0)
        self.fh.truncate()
        self.fh.write(str(os.getpid()))
        self.fh.flush()
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _run_and_publish(run, stage, fn, cfg: Recipe, config, inputs, licence, key, work: Path, final: Path) -> Path:
    (work / "stage.json").write_text(canonical({"stage": stage, "key": key}), encoding="utf-8")
    console.print(f"[bold cyan]▶[/] {stage} → {final}")
    started = time.time()
    result = fn(cfg, {k: v[1] for k, v in inputs.items() if v[1] is not None}, work)
    wall = time.time() - started
    shutil.rmtree(work / RESUME_DIR, ignore_errors=True)
    files = _hash_files(work)
    manifest = {
        "stage": stage,
        "key": key,
        "config": config,
        "inputs": {k: v[0] for k, v in inputs.items()},
        "files": files,
        "digest": digest_of(files),
        "metrics": result.metrics,
        "seeds": result.seeds,
        "notes": result.notes,
        "licence": licence,
        "versions": versions(),
        "timings": {"wall_s": round(wall, 3), "finished_unix": round(time.time(), 3)},
    }
    write_json_atomic(work / MANIFEST, manifest)  # last file written: its presence means "complete"
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(work, final)
    console.print(f"[green]✓[/] {stage}: done in {wall:.1f}s")
    return final
