"""Parquet artifacts: atomic writes, a JSON manifest in the footer, and "up to date" skips.

Every file a stage writes carries its manifest under the footer key `cfiw`, readable from
DuckDB with `select value from parquet_kv_metadata('file.parquet') where key = 'cfiw'`.
A write goes to a temp file in the same directory and is renamed into place, so a killed
stage never leaves a file under the final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cfiw_cli import __version__
from cfiw_cli.configs import at_quiet_default
from cfiw_cli.errors import CfiwError
from cfiw_cli.registry import STAGES
from cfiw_cli.schemas import SCHEMAS, validate

MANIFEST_KEY = b"cfiw"
DIRECTORY_MANIFEST = "cfiw_manifest.json"  # the manifest of a stage whose output is a directory
_LIBRARIES = ("torch", "transformers", "tokenizers", "datasets", "pyarrow", "accelerate", "trl")


def same_path(a: Path, b: Path) -> bool:
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def lies_inside(path: Path, directory: Path) -> bool:
    """Whether `path` is below `directory` (not `directory` itself), links resolved."""
    return Path(directory).expanduser().resolve() in Path(path).expanduser().resolve().parents


def remove_stale_temp_files(out: Path) -> None:
    """Temp files a killed atomic write of `out` left beside it (`.NAME.*.tmp`)."""
    for stale in out.parent.glob(f".{out.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def prepare_output(path: str | os.PathLike) -> Path:
    """Create the parent directory and prove it is writable before any expensive work."""
    out = Path(path)
    if out.is_dir():
        raise CfiwError(f"output path {out} is a directory", "pass a file name such as rollouts.parquet")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise CfiwError(
            f"cannot write to output directory {out.parent}: {exc.strerror or exc}",
            "choose an --out path in a writable directory",
        ) from exc
    return out


def _hash_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


RECORD_MIN_BYTES = 1 << 20  # smaller files are hashed again each time: it is quicker than a record


def hash_records() -> Path:
    """Where file hashes are recorded: $CFIW_CACHE_DIR/hashes, else the user's cache directory.
    Not inside or beside the hashed files: a model directory may be read-only (a hub cache),
    and a record among a run's files would change what is hashed and what the run holds."""
    root = os.environ.get("CFIW_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cfiw"
    return Path(root) / "hashes"


def rehash_requested() -> bool:
    """`cfiw --rehash` (or CFIW_REHASH=1): hash every input afresh, ignoring the records."""
    return os.environ.get("CFIW_REHASH", "").strip() not in ("", "0", "false", "no")


def _recorded_hash(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """The file's sha256 from its record while its size, mtime_ns and inode are those recorded,
    else hashed and recorded. A record that cannot be read or written is hashed around."""
    record = hash_records() / f"{hashlib.sha256(path.encode()).hexdigest()[:40]}.json"
    key = {"path": path, "size": size, "mtime_ns": mtime_ns, "inode": inode}
    if not rehash_requested():
        try:
            recorded = json.loads(record.read_text(encoding="utf-8"))
            if {k: recorded.get(k) for k in key} == key and isinstance(recorded.get("sha256"), str):
                return recorded["sha256"]
        except (OSError, ValueError, AttributeError):
            pass
    digest = _hash_file(Path(path))
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=record.parent, suffix=".tmp", delete=False) as handle:
            json.dump({**key, "sha256": digest}, handle)
        os.replace(handle.name, record)
    except OSError:
        with contextlib.suppress(OSError, NameError):
            os.unlink(handle.name)
    return digest


@lru_cache(maxsize=256)
def _cached_hash(path: str, size: int, mtime_ns: int, inode: int) -> str:
    if size < RECORD_MIN_BYTES:
        return _hash_file(Path(path))
    return _recorded_hash(path, size, mtime_ns, inode)


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory's (relative path, file sha256) list. A file of 1 MiB
    or more is hashed once: its hash is recorded (`hash_records`) and trusted while the file's
    size, mtime_ns and inode stay the same."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return _cached_hash(str(path.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(sha256_of(file).encode())
    return digest.hexdigest()


def input_record(ref: str, revision: str | None = None) -> dict[str, Any]:
    """Describe one input: a local path gets its sha256; a hub id is kept as given, with the
    commit its revision resolved to (`revision`) when known. LoRA adapters are only half a
    model: their record adds the base they name (`base`), and their sha256 covers the base's
    (its sha256, or a hub base's commit), so another base behind the same adapters is another
    input."""
    if not os.path.exists(ref):
        return {"path": str(ref), "sha256": None, **({"revision": revision} if revision else {})}
    record = {"path": str(ref), "sha256": sha256_of(ref)}
    base = _adapter_base(Path(ref))
    if base is not None:
        record["base"] = input_record(*base)
        identity = f"{record['sha256']}+{record['base']['sha256'] or record['base'].get('revision')}"
        record["sha256"] = hashlib.sha256(identity.encode()).hexdigest()
    return record


def _adapter_base(path: Path) -> tuple[str, str | None] | None:
    """(base, commit) named by the adapter_config.json of a LoRA directory, else None."""
    config = path / "adapter_config.json"
    if not config.is_file():
        return None
    try:
        recorded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # loading it says what is wrong
    base = recorded.get("base_model_name_or_path") if isinstance(recorded, dict) else None
    return (str(base), recorded.get("revision")) if base else None


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str | None]:
    return dict(_library_versions())


@lru_cache(maxsize=1)  # installed versions do not change under a running process; reading them takes ~20 ms
def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "cfiw": __version__}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_manifest(
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, dict[str, Any]],
    *,
    rows: int,
    seconds: float,
    device: str | None = None,
    seed: int | None = None,
    metrics: dict[str, Any] | None = None,
    dtype: str | None = None,
) -> dict[str, Any]:
    return {
        "stage": stage,
        "version": __version__,
        "git_commit": git_commit(),
        "config": config,
        "seed": seed,
        "inputs": inputs,
        "rows": rows,
        "wall_seconds": round(seconds, 3),
        "libraries": library_versions(),
        "device": device,
        **({"dtype": dtype} if dtype else {}),  # what the model computed in, resolved (not "auto")
        "metrics": metrics or {},
    }


def _fsync(path: Path) -> None:
    """Push a file's (or a directory entry's) data to disk, so a rename never lands before it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            _fsync(path)
    _fsync(root)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; it is synced and renamed onto `final` only if the
    block succeeds. An OS error (permissions, a full disk) names `final`, not the temp file."""
    try:
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(final, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes 0600; the final file gets the usual mode
    try:
        try:
            yield tmp_path
            _fsync(tmp_path)
            os.replace(tmp_path, final)
            _fsync(final.parent)
        except OSError as exc:
            raise _write_error(final, exc) from exc
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """A small text file (a run's config, its state) replaced whole, never half-written."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def _write_error(final: Path, exc: OSError) -> CfiwError:
    if exc.errno == errno.ENOSPC:
        return CfiwError(f"no space left on the device while writing {final}", "free some disk space and run again")
    return CfiwError(f"cannot write {final}: {exc.strerror or exc}", "choose a writable output path")


COMPLETE = ".complete"  # written last into a staged directory: it is whole and may be swapped in
PENDING = ".pending"  # files a staged directory carries to paths outside it, with targets.json


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield an empty `<final>.tmp`; it replaces `final` only if the block succeeds, so a
    killed stage never leaves a half-written directory under the final name.

    The commit: everything is synced, `.complete` is written into the staging directory, then
    `final` -> `<final>.old`, `<final>.tmp` -> `final`, and the files staged with `stage_file`
    are moved to their places outside it. `recover_directory` finishes or undoes a commit that
    a kill interrupted, whatever the moment."""
    recover_directory(final)
    tmp = _tmp_of(final)
    try:
        tmp.mkdir(parents=True)
    except OSError as exc:
        raise _write_error(final, exc) from exc
    try:
        yield tmp
        try:
            _fsync_tree(tmp)
            (tmp / COMPLETE).write_text("")
            _fsync(tmp / COMPLETE)
            _fsync(tmp)
            _swap_in(final)
        except OSError as exc:  # a full disk, a read-only file system: the old directory stays
            old = _old_of(final)
            if not final.exists() and old.exists():
                old.rename(final)
            raise _write_error(final, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stage_file(staging: Path, target: Path) -> Path:
    """A path inside `staging` for a file whose place is `target`, outside the directory: it
    moves there as part of the commit."""
    pending = staging / PENDING
    pending.mkdir(exist_ok=True)
    targets_file = pending / "targets.json"
    targets = json.loads(targets_file.read_text()) if targets_file.exists() else {}
    name = f"{len(targets)}{target.suffix}"
    targets[name] = str(target.resolve())
    targets_file.write_text(json.dumps(targets))
    return pending / name


def written_files(staging: Path) -> list[str]:
    """The files a stage put into its staged directory, as sorted relative paths (what it
    owns when it replaces the directory later; the manifest itself and the commit's own
    bookkeeping left out)."""
    skipped = {COMPLETE, DIRECTORY_MANIFEST}
    return sorted(
        str(p.relative_to(staging))
        for p in staging.rglob("*")
        if p.is_file() and p.relative_to(staging).parts[0] not in (PENDING, *skipped)
    )


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _tmp_of(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def _old_of(final: Path) -> Path:
    return final.with_name(final.name + ".old")


def _swap_in(final: Path) -> None:
    tmp, old = _tmp_of(final), _old_of(final)
    _remove(old)
    if final.exists() or final.is_symlink():
        final.rename(old)
    tmp.rename(final)
    _fsync(final.parent)
    (final / COMPLETE).unlink()
    _remove(old)
    _finish_pending(final)


def _finish_pending(final: Path) -> None:
    pending = final / PENDING
    if not pending.is_dir():
        return
    targets_file = pending / "targets.json"
    targets = json.loads(targets_file.read_text()) if targets_file.exists() else {}
    for name, target in targets.items():
        if (pending / name).exists():
            os.replace(pending / name, target)
            _fsync(Path(target).parent)
    shutil.rmtree(pending)


def recover_directory(final: Path) -> None:
    """Bring `final` to a whole state after a kill: a complete staged copy is swapped in (the
    commit is finished), an incomplete one is dropped and the previous `final` kept."""
    tmp, old = _tmp_of(final), _old_of(final)
    if tmp.is_dir() and (tmp / COMPLETE).exists():
        if not final.exists() and old.exists():
            old.rename(final)  # the first rename of the swap happened; redo the swap whole
        _swap_in(final)
        return
    shutil.rmtree(tmp, ignore_errors=True)
    if not final.exists() and old.exists():
        old.rename(final)
    if final.is_dir():
        (final / COMPLETE).unlink(missing_ok=True)  # killed after the swap, before the tidy-up
        _finish_pending(final)
    _remove(old)


def write_directory_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / DIRECTORY_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def recorded_value(path: Path, key: str, valid: Callable[[Any], bool], hint: str, default: Any = None) -> Any:
    """`key` of the JSON object in one of the small records (loop_state.json, best.json,
    trainer_state.json); an unreadable file, a missing key (unless a `default` stands for it,
    as for records written before the key existed) or a value that is not `valid` is a
    `CfiwError` naming the file, with `hint` saying what to do."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        value = record.get(key, default) if default is not None and isinstance(record, dict) else record[key]
    except OSError as exc:
        raise CfiwError(f"cannot read {path}: {exc}", hint) from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise CfiwError(f"{path} is corrupt ({exc})", hint) from exc
    if isinstance(value, bool) or not valid(value):
        raise CfiwError(f"{path} is corrupt ({key} = {value!r})", hint)
    return value


def read_directory_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a directory output; None when missing or not a JSON object."""
    try:
        manifest = json.loads((Path(directory) / DIRECTORY_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_table(table: pa.Table, path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    final = Path(path)
    metadata_ = dict(table.schema.metadata or {})
    metadata_[MANIFEST_KEY] = json.dumps(manifest, sort_keys=True, default=str).encode()
    table = table.replace_schema_metadata(metadata_)
    with atomic_path(final) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)
    return final


def read_manifest(path: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest in a Parquet file's footer; None for a file without one (or no Parquet
    file at all). A manifest that is not a JSON object is a `CfiwError` naming the file."""
    try:
        kv = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid):
        return None
    raw = kv.get(MANIFEST_KEY)
    if not raw:
        return None
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict):
        raise CfiwError(
            f"{path} has a corrupt cfiw manifest (its footer key 'cfiw' is not a JSON object)",
            "write the file again with the cfiw stage that made it",
        )
    return manifest


def manifest_if_any(path: Path) -> dict[str, Any] | None:
    """The manifest of a file or directory output, or None when it has none or a corrupt one
    (which then counts as written by someone else)."""
    if path.is_dir():
        return read_directory_manifest(path)
    try:
        return read_manifest(path)
    except CfiwError:
        return None


def is_parquet(path: Path) -> bool:
    """Whether `path` is a file with a readable Parquet footer."""
    try:
        pq.read_metadata(path)
    except (OSError, pa.ArrowInvalid):
        return False
    return True


def read_artifact(path: str | os.PathLike, kind: str) -> pa.Table:
    """Read and validate a Parquet artifact; a missing file, a directory, a damaged page (every
    page's checksum is verified when the file has them) or a bad schema is a `CfiwError`."""
    path = Path(path)
    if not path.exists():
        raise CfiwError(f"{kind} file not found: {path}", f"create it first or check the --{kind} path")
    if path.is_dir():
        raise CfiwError(f"{path} is a directory, not a {kind} file", f"pass the {kind}.parquet file itself")
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowInvalid) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CfiwError(
            f"{path} is not a readable Parquet file: {first}",
            "it is damaged or not Parquet: write it again with the stage that made it",
        ) from exc
    return validate(table, kind, str(path))


def settings_of(config: Any, *outputs: str) -> dict[str, Any]:
    """A stage config as recorded in its manifest and compared for "up to date": every field
    but the output paths (moving an output does not change what it holds) and quiet fields at
    their default (see `configs.flag`)."""

    recorded = asdict(config).items()
    return {k: v for k, v in recorded if k not in ("out", *outputs) and not at_quiet_default(config, k)}


def up_to_date(
    path: Path, stage: str, config: dict[str, Any], inputs: dict[str, dict[str, Any]], partial: bool = False
) -> bool:
    """True when `path` (a Parquet file, or a directory with a manifest file) was written by
    the same stage, config and input hashes. With `partial`, inputs the manifest records beyond
    `inputs` are not compared (a checkpoint trained in place no longer has its starting model)."""
    if not path.exists():
        return False
    manifest = manifest_if_any(path)
    if not manifest:
        return False
    # Round-trip through JSON so tuples/paths compare the way they were stored.
    same_config = manifest.get("config") == json.loads(json.dumps(config, default=str))
    recorded = {k: (v.get("sha256"), v.get("revision")) for k, v in manifest.get("inputs", {}).items()}
    if partial:
        recorded = {k: v for k, v in recorded.items() if k in inputs}
    same_inputs = recorded == {k: (v.get("sha256"), v.get("revision")) for k, v in inputs.items()}
    return manifest.get("stage") == stage and same_config and same_inputs


def infer_kind(path: Path, manifest: dict[str, Any] | None) -> str:
    """Artifact kind from the manifest's stage, else from the file name (`rollouts.parquet`),
    else from the columns (train writes two kinds: step metrics and token weights)."""
    writes = STAGES[manifest["stage"]].writes if manifest and manifest.get("stage") in STAGES else None
    if writes:
        return writes
    for candidate in (path.stem, path.parent.name):
        if candidate in SCHEMAS:
            return candidate
    try:
        columns = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):
        columns = set()
    matching = [kind for kind, schema in SCHEMAS.items() if set(schema.names) <= columns]
    if len(matching) == 1:
        return matching[0]
    raise CfiwError(f"cannot tell what kind of artifact {path} is", f"pass --kind (one of {', '.join(SCHEMAS)})")
