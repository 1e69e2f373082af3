"""Run directories on object storage through fsspec: `output_root=s3://bucket/prefix` (gs://, file://, memory://,
any protocol fsspec has an implementation for) and `resume=s3://bucket/prefix/RUN`. Plain paths never reach this
module's fsspec code (fsspec is imported only for a URL).

A run whose output_root is a URL writes exactly as a local run does (the same atomic renames, SHA256 manifests,
retention and lock) into a staging copy of its run directory, `.trainrun/remote/<protocol>/<bucket>/<prefix>/<run>`
under the working directory, next to the default `runs/`: a clean working directory starts with an empty cache and
the path alone says which URL a staging directory mirrors (`remote_of`). After each checkpoint is complete locally,
`upload` copies it to the store:

  1. every file of RUN/checkpoints/step_N/ under its final key, each read back from the store and its SHA256
     compared with the local file's (the checkpoint's own manifest, state.pt.sha256, goes last);
  2. RUN/checkpoints/step_N/.trainrun-upload.sha256, the upload record (every file and its SHA256), written only
     after all of them verified: a folder without it is an unfinished upload that no reader uses;
  3. the pointers RUN/checkpoints/latest and best, last; a pointer names only a checkpoint whose record exists;
  4. the remote checkpoints local retention removed, deleted after the pointers moved (their record first);
  5. the run's other files (config.yaml, metrics.jsonl, trainrun.log, plots, ...).

S3 has no rename, so nothing is renamed: what a reader trusts is the record, and the pointer written after it.
`fetch` (a resume or mode=eval from a URL) downloads into the staging directory the newest checkpoint whose record
exists and whose every file matches it (and the one `best` names), then the run's other files; the resume then goes
on exactly as a local one (checkpoint.load verifies state.pt again before unpickling).

Credentials and the endpoint come from the environment, as each fsspec backend reads it (S3: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_ENDPOINT_URL for a non-AWS endpoint; GCS: GOOGLE_APPLICATION_CREDENTIALS):
a config key would copy secrets into config.yaml and meta.json.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from trainrun.errors import CheckpointError, ConfigError, TrainrunError

log = logging.getLogger("trainrun")

STAGING = Path(".trainrun") / "remote"
RECORD = ".trainrun-upload.sha256"
POINTERS = ("latest", "best")
KILL_AFTER_ENV = "TRAINRUN_TEST_KILL_AFTER_UPLOAD"  # tests only: SIGKILL this process right after uploading a file
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
_STEP = re.compile(r"step_[0-9]+")
_BUCKETED = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl")  # the first path part is a bucket/container
_LOCAL = ("file", "local")  # protocols whose paths are absolute file system paths
_CHUNK = 8 << 20


def is_url(value: Any) -> bool:
    return isinstance(value, str) and _URL.match(value) is not None


def _parts(url: str, key: str) -> Tuple[str, List[str]]:
    protocol, rest = _URL.match(url).groups()
    parts = [p for p in rest.split("/") if p]
    bad = next((p for p in parts if p in (".", "..") or "${" in p or "\\" in p or "\0" in p), None)
    if not parts or bad is not None:
        why = "it names no bucket" if not parts else f"{bad!r} is not a plain folder name"
        raise ConfigError(f"{key}={url}: not a usable storage URL ({why}); use one like s3://bucket/runs")
    return protocol.lower(), parts


def staging_dir(url: str, key: str = "output_root") -> Path:
    """The local staging copy of the run directory (or run root) at `url`."""
    protocol, parts = _parts(url, key)
    return STAGING.joinpath(protocol, *parts)


def local_root(output_root: Any) -> Path:
    """Where runs under `output_root` are written on this machine: the staging directory of a URL, else the path."""
    return staging_dir(output_root) if is_url(output_root) else Path(output_root)


def remote_of(local: Path) -> Optional[str]:
    """The URL a staging directory mirrors (None for any other directory)."""
    try:
        rel = Path(local).resolve().relative_to(STAGING.resolve())
    except (ValueError, OSError):
        return None
    if len(rel.parts) < 2 or any(p.startswith(".") for p in rel.parts):  # a scratch folder (.badstep-, .tmp-)
        return None
    protocol, rest = rel.parts[0], "/".join(rel.parts[1:])
    return f"{protocol}:///{rest}" if protocol in _LOCAL else f"{protocol}://{rest}"


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _problem(e: BaseException, url: str, key: str) -> Optional[str]:
    """The one-line diagnosis of a storage error that the user can fix (credentials, endpoint, bucket), or None."""
    names = {c.__name__ for c in type(e).__mro__}
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    if names & {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}:
        return (f"{key}={url}: no credentials for the store ({_why(e)}); set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL for a non-AWS endpoint")
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ConnectionClosedError", "ClientConnectorError",
                "ConnectionError", "ConnectionRefusedError"}:
        where = f"AWS_ENDPOINT_URL={endpoint}" if endpoint else "the default endpoint"
        return (f"{key}={url}: cannot reach the store at {where} ({_why(e)}); check the network, or set "
                "AWS_ENDPOINT_URL to the store's address")
    if isinstance(e, PermissionError) or names & {"InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return (f"{key}={url}: access denied ({_why(e)}); check the credentials in AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the bucket's permissions")
    return None


def filesystem(url: str, key: str = "output_root", quick: bool = False):
    """(fsspec filesystem, the URL's path in it); a protocol fsspec does not know or whose package is missing is
    one line naming the install. `quick`: fewer retries (a check before the run, where a dead endpoint should be
    one line in seconds)."""
    protocol, _ = _parts(url, key)
    try:
        import fsspec
    except ImportError as e:
        raise ConfigError(f"{key}={url}: object storage needs fsspec and its backend: pip install 'trainrun[s3]'") \
            from e
    try:
        cls = fsspec.get_filesystem_class(protocol)
    except ValueError as e:
        raise ConfigError(f"{key}={url}: fsspec has no implementation of {protocol}://; use s3://, gs://, "
                          "file:// or a local path") from e
    except ImportError as e:
        need = "pip install 'trainrun[s3]'" if protocol in ("s3", "s3a") else \
            f"install the fsspec backend for {protocol}:// ({_why(e)})"
        raise ConfigError(f"{key}={url}: {protocol}:// needs a package that is not installed: {need}") from e
    options: Dict[str, Any] = {"skip_instance_cache": True}  # fresh listings: another process writes the bucket
    if protocol in ("s3", "s3a"):
        attempts = 1 if quick else 3
        options["config_kwargs"] = {"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": attempts}}
    fs = cls(**options)
    if quick and hasattr(fs, "retries"):  # s3fs retries connection errors itself too, with backoff
        fs.retries = 1
    return fs, cls._strip_protocol(url).rstrip("/")


def check_remote(url: str, key: str = "output_root") -> None:
    """Before any compute: the backend is installed, the credentials work and the bucket exists (read-only: a
    listing of the URL's folder, which may not exist yet)."""
    fs, path = filesystem(url, key, quick=True)
    protocol, parts = _parts(url, key)
    try:
        fs.ls(path, detail=False)
    except FileNotFoundError as e:
        if protocol in _BUCKETED and "bucket" in str(e).lower():
            raise ConfigError(f"{key}={url}: the bucket {parts[0]!r} does not exist; create it (aws s3 mb "
                              f"{protocol}://{parts[0]}) or fix the URL") from e
    except Exception as e:  # noqa: BLE001  (every backend raises its own types)
        raise ConfigError(_problem(e, url, key) or f"{key}={url}: the store cannot be read ({_why(e)}); check "
                          "the URL and the credentials") from e


def remote_checkpoints(fs, run_path: str) -> List[str]:
    """The step_* folder names under RUN/checkpoints/ in the store, oldest first (complete or not)."""
    try:
        fs.invalidate_cache()
        entries = fs.ls(f"{run_path}/checkpoints", detail=False)
    except FileNotFoundError:
        return []
    names = {e.rstrip("/").rsplit("/", 1)[-1] for e in entries}
    return sorted(n for n in names if _STEP.fullmatch(n))


def _newest_recorded(url: str, key: str) -> Optional[str]:
    """The newest checkpoint of the run at `url` whose upload finished (its record exists), or None."""
    fs, path = filesystem(url, key)
    try:
        for name in reversed(remote_checkpoints(fs, path)):
            if fs.exists(f"{path}/checkpoints/{name}/{RECORD}"):
                return name
    except Exception as e:  # noqa: BLE001
        raise ConfigError(_problem(e, url, key) or f"{key}={url}: the store cannot be read ({_why(e)})") from e
    return None


def check_new_run(url: str, key: str = "output_root") -> None:
    """A new run named into a URL must not write over a run the store already holds checkpoints of."""
    found = _newest_recorded(url, key)
    if found:
        raise ConfigError(f"run directory {url} already has checkpoints in the store ({found} is the newest); "
                          f"continue it with resume={url} (or resume=auto) or pick another run_name")


def fetch_if_any(url: str, key: str = "resume") -> Optional[Path]:
    """resume=auto with a URL output_root: the store's run downloaded into its staging directory (which
    resume=auto then finds as on a local disk) if the store holds a complete checkpoint of it, else None."""
    return fetch(url, key) if _newest_recorded(url, key) else None


# --- helpers on files ----------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    from trainrun.usercode import sha256_of  # the project's one file hash

    return sha256_of(path)


def _sha256_remote(fs, key: str) -> str:
    h = hashlib.sha256()
    with fs.open(key, "rb", block_size=_CHUNK) as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path, skip_top: Iterable[str] = (), hidden: bool = False) -> List[str]:
    """Relative paths of the plain files under `folder`, sorted, without the top-level entries `skip_top`. Hidden
    files and folders (locks, temporaries) are left out unless `hidden` (a sharded checkpoint's dcp/.metadata);
    the upload record never counts."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel = Path(dirpath).relative_to(folder)
        top = rel == Path(".")
        dirnames[:] = sorted(d for d in dirnames if (hidden or not d.startswith(".")) and not (top and d in skip_top))
        out += [(rel / f).as_posix() for f in filenames if (hidden or not f.startswith(".")) and f != RECORD
                and not (top and f in skip_top) and os.path.isfile(os.path.join(dirpath, f))]
    return sorted(out)


def format_record(digests: Dict[str, str]) -> bytes:
    return "".join(f"{sha}  {name}\n" for name, sha in sorted(digests.items())).encode()


def parse_record(data: bytes) -> Optional[Dict[str, str]]:
    """An upload record (read from the store: untrusted) as {relative path: sha256}, or None if malformed."""
    out: Dict[str, str] = {}
    try:
        for line in filter(str.strip, data.decode().splitlines()):
            sha, name = line.split("  ", 1)
            parts = name.split("/")
            if len(sha) != 64 or set(sha) - set("0123456789abcdef") or name in out or name == RECORD or \
                    any(p in ("", ".", "..") for p in parts) or "\\" in name:
                return None
            out[name] = sha
    except (UnicodeDecodeError, ValueError):
        return None
    return out or None


def _kill_point(what: str) -> None:
    """Tests only: die by SIGKILL right after uploading `what` (deterministic 'kill -9 mid-upload')."""
    target = os.environ.get(KILL_AFTER_ENV)
    if target and what.endswith(target):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# --- upload -----------------------------------------------------------------------------------------------------

class Mirror:
    """The store side of one staging run directory: uploads its checkpoints, pointers and files (see the module
    docstring for the order). One per run and process; remembers what it already put there."""

    def __init__(self, run_dir: Path, url: str):
        self.run_dir, self.url = Path(run_dir), url
        self.fs, self.path = filesystem(url)
        self.folders = url.split("://", 1)[0].lower() in _LOCAL  # real folders to create; object stores have none
        self.recorded: Dict[str, Dict[str, str]] = {}  # checkpoint name -> its record, as the store holds it
        self.verified: set = set()  # checkpoints whose store copy this process checked against the local folder
        self.pointers: Dict[str, str] = {}
        self.sent: Dict[str, Tuple[int, int]] = {}  # run file -> (size, mtime_ns) at its last upload
        self.caught_up = False

    def _key(self, *parts: str) -> str:
        return "/".join((self.path, *parts))

    def _put(self, local: Path, key: str) -> None:
        if self.folders:
            self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(str(local), key)

    def _pipe(self, key: str, data: bytes) -> None:
        if self.folders:
            self.fs.makedirs(key.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(key, data)

    def record_of(self, name: str) -> Optional[Dict[str, str]]:
        if name not in self.recorded:
            try:
                found = parse_record(self.fs.cat_file(self._key("checkpoints", name, RECORD)))
            except FileNotFoundError:
                found = None
            if found is None:
                return None
            self.recorded[name] = found
        return self.recorded[name]

    def upload_checkpoint(self, ckpt_dir: Path) -> None:
        from trainrun.checkpoint import DIGEST, RECORDS

        name = ckpt_dir.name
        digests = {rel: sha256_file(ckpt_dir / rel) for rel in _files(ckpt_dir, skip_top=RECORDS, hidden=True)}
        if self.record_of(name) == digests:
            self.verified.add(name)
            return  # already in the store, byte for byte
        record_key = self._key("checkpoints", name, RECORD)
        if self.fs.exists(record_key):  # the same step saved again: unrecorded while its files are replaced
            self.fs.rm_file(record_key)
        self.recorded.pop(name, None)
        for rel in sorted(digests, key=lambda r: (r == DIGEST, r)):  # the checkpoint's own manifest last
            key = self._key("checkpoints", name, rel)
            self._put(ckpt_dir / rel, key)
            stored = _sha256_remote(self.fs, key)
            if stored != digests[rel]:
                raise CheckpointError(f"the store holds {self.url}/checkpoints/{name}/{rel} with SHA256 "
                                      f"{stored[:12]}, the file written was {digests[rel][:12]}: the upload was "
                                      "corrupted; the store's latest still names the previous checkpoint")
            _kill_point(f"{name}/{rel}")
        self._pipe(record_key, format_record(digests))
        self.recorded[name] = digests
        self.verified.add(name)
        _kill_point(f"{name}/{RECORD}")

    def catch_up(self, current: Path) -> None:
        """Once per process, before its first upload: the local checkpoints the store lacks (a run killed during
        an upload and continued from the staging copy resumed from a checkpoint the store never got)."""
        from trainrun import checkpoint

        if self.caught_up:
            return
        for ckpt in checkpoint.list_checkpoints(self.run_dir):
            if ckpt.name != Path(current).name:
                self.upload_checkpoint(ckpt)
        self.caught_up = True

    def move_pointers(self) -> None:
        """The store's latest/best name what the local ones name, once that checkpoint is recorded in the store."""
        from trainrun import checkpoint

        for pointer in POINTERS:
            target = checkpoint.read_pointer(self.run_dir, pointer)
            if target is None or self.pointers.get(pointer) == target.name:
                continue
            if target.name not in self.verified:  # e.g. `best` from before a resume: make sure the store has it
                self.upload_checkpoint(target)
            self._pipe(self._key("checkpoints", pointer), (target.name + "\n").encode())
            self.pointers[pointer] = target.name
            _kill_point(f"checkpoints/{pointer}")

    def delete_removed(self) -> None:
        """Checkpoints this process uploaded (or found recorded) that local retention has since removed; the record
        goes first, so a reader never takes a half-deleted folder for a checkpoint."""
        for name in sorted(self.recorded):
            if (self.run_dir / "checkpoints" / name).is_dir() or name in self.pointers.values():
                continue
            folder = self._key("checkpoints", name)
            try:
                self.fs.rm_file(f"{folder}/{RECORD}")
            except FileNotFoundError:
                pass
            self.fs.rm(folder, recursive=True)
            del self.recorded[name]
            self.verified.discard(name)

    def sync_files(self) -> None:
        """The run's files outside checkpoints/ that changed since this process last sent them."""
        for rel in _files(self.run_dir, skip_top=("checkpoints",)):
            st = (self.run_dir / rel).stat()
            if self.sent.get(rel) == (st.st_size, st.st_mtime_ns):
                continue
            self._put(self.run_dir / rel, self._key(rel))
            self.sent[rel] = (st.st_size, st.st_mtime_ns)


_MIRRORS: Dict[str, Mirror] = {}


def mirror(run_dir: Path) -> Optional[Mirror]:
    url = remote_of(run_dir)
    if url is None:
        return None
    if url not in _MIRRORS:
        _MIRRORS[url] = Mirror(run_dir, url)
    return _MIRRORS[url]


def upload(run_dir: Path, ckpt_dir: Path) -> None:
    """After a checkpoint is complete locally (pointers moved, retention applied): copy it to the store the run
    directory mirrors, verified, then the pointers, retention's deletions and the run's files. No-op for a run
    directory that mirrors no store."""
    m = mirror(run_dir)
    if m is None:
        return
    try:
        m.catch_up(Path(ckpt_dir))
        m.upload_checkpoint(Path(ckpt_dir))
        m.move_pointers()
        m.delete_removed()
        m.sync_files()
    except TrainrunError:
        raise
    except Exception as e:  # noqa: BLE001
        why = _problem(e, m.url, "output_root") or _why(e)
        raise CheckpointError(f"checkpoint {Path(ckpt_dir).name} is complete in {run_dir} but its upload to "
                              f"{m.url} failed ({why}); the store's latest names the newest checkpoint whose upload "
                              f"completed; fix the store, then continue with resume={m.url}") from e


def sync_run(run_dir: Path) -> None:
    """At the end of a command: the run's files (report, plots, final metrics) to the store it mirrors. A failure
    is a warning: every checkpoint is already there."""
    m = mirror(run_dir)
    if m is None:
        return
    try:
        m.sync_files()
    except Exception as e:  # noqa: BLE001
        why = _problem(e, m.url, "output_root") or _why(e)
        print(f"warning: could not upload the run's files to {m.url} ({why}); they are in {run_dir}", flush=True)


# --- download -----------------------------------------------------------------------------------------------------

class _Unusable(Exception):
    """A remote checkpoint that is not a complete, verified upload."""


_FETCHED: Dict[str, Path] = {}
_SUPERSEDED: set = set()  # fetched checkpoints (resolved paths) older than the newest complete one in the store


def superseded(ckpt_dir: Path) -> bool:
    """Whether `ckpt_dir` was fetched by its URL and the store holds a newer complete checkpoint of its run (the
    staging copy alone cannot tell: resuming it branches, as resuming an older local checkpoint does)."""
    return str(Path(ckpt_dir).resolve()) in _SUPERSEDED


def fetch(url: str, key: str = "resume") -> Path:
    """Download the run (or the checkpoint) at `url` into its staging directory and return that local path: the
    newest checkpoint whose upload record exists and whose every file matches it, the one the store's `best` names,
    and the run's other files the staging directory lacks. Once per URL and process."""
    if url in _FETCHED:
        return _FETCHED[url]
    fs, path = filesystem(url, key)
    _, parts = _parts(url, key)
    only = parts[-1] if len(parts) >= 3 and parts[-2] == "checkpoints" and _STEP.fullmatch(parts[-1]) else None
    run_url = url.rstrip("/").rsplit("/", 2)[0] if only else url.rstrip("/")
    run_path = path.rsplit("/", 2)[0] if only else path
    local_run = staging_dir(run_url, key)
    check_remote(run_url, key)  # credentials, endpoint, bucket: named in one line, with few retries
    try:
        chosen, skipped = _fetch_newest(fs, run_path, local_run, [only] if only else None)
        if chosen is None:
            detail = f": {skipped[0]}" if skipped else ""
            raise CheckpointError(f"{key}={url}: no complete checkpoint in the store{detail}; pass the URL of a run "
                                  "directory that a run with output_root=<url> wrote, or of its checkpoints/step_N")
        for why in skipped:
            log.warning("skipped an incomplete checkpoint in the store: %s", why)
        if not only:
            _fetch_best(fs, run_path, local_run, chosen)
        _fetch_files(fs, run_path, local_run)
    except TrainrunError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(_problem(e, url, key) or f"{key}={url}: could not download from the store "
                              f"({_why(e)})") from e
    _FETCHED[url] = local_run / "checkpoints" / only if only else local_run
    if only and (_newest_recorded(run_url, key) or only) > only:
        _SUPERSEDED.add(str(_FETCHED[url].resolve()))
    return _FETCHED[url]


def _fetch_newest(fs, run_path: str, local_run: Path, names: Optional[List[str]]) -> Tuple[Optional[str], List[str]]:
    from trainrun import checkpoint

    skipped = []
    for name in names or list(reversed(remote_checkpoints(fs, run_path))):
        try:
            _fetch_checkpoint(fs, run_path, local_run, name)
        except _Unusable as e:
            skipped.append(f"{name}: {e}")
            continue
        newest = checkpoint.list_checkpoints(local_run)[-1]  # the staging copy may hold a newer complete one
        checkpoint.write_pointer(local_run, "latest", newest)
        return name, skipped
    return None, skipped


def _fetch_best(fs, run_path: str, local_run: Path, chosen: str) -> None:
    from trainrun import checkpoint

    try:
        name = fs.cat_file(f"{run_path}/checkpoints/best").decode().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return
    if not _STEP.fullmatch(name):
        return
    try:
        if name != chosen:
            _fetch_checkpoint(fs, run_path, local_run, name)
    except _Unusable as e:
        log.warning("the store's best names %s, which is not a complete upload (%s); best is not restored", name, e)
        return
    checkpoint.write_pointer(local_run, "best", local_run / "checkpoints" / name)


def _fetch_checkpoint(fs, run_path: str, local_run: Path, name: str) -> None:
    """checkpoints/NAME into the staging run, every file verified against the upload record (written into a
    `.tmp-` folder, renamed into place), unless the staging copy already holds exactly those files."""
    folder = f"{run_path}/checkpoints/{name}"
    try:
        record = parse_record(fs.cat_file(f"{folder}/{RECORD}"))
    except FileNotFoundError:
        raise _Unusable("no upload record (the upload did not finish)") from None
    if record is None:
        raise _Unusable(f"its {RECORD} is malformed")
    root = local_run / "checkpoints"
    final = root / name
    if _holds(final, record):
        return
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, sha in record.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                fs.get_file(f"{folder}/{rel}", str(tmp / rel))
            except FileNotFoundError:
                raise _Unusable(f"{rel}, listed in its upload record, is missing") from None
            if sha256_file(tmp / rel) != sha:
                raise _Unusable(f"{rel} does not match the SHA256 its upload record lists")
        if _holds(final, record):  # another process (a torchrun rank) downloaded it meanwhile
            return
        old = root / f".old-{name}-{os.getpid()}"
        if final.exists():  # a staging copy with other files: the store's verified copy replaces it
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _holds(folder: Path, record: Dict[str, str]) -> bool:
    return folder.is_dir() and all((folder / rel).is_file() and sha256_file(folder / rel) == sha
                                   for rel, sha in record.items())


def _fetch_files(fs, run_path: str, local_run: Path) -> None:
    """The run's files outside checkpoints/ (config.yaml, metrics.jsonl, logs) that the staging copy lacks."""
    prefix = run_path.rstrip("/") + "/"
    fs.invalidate_cache()
    for key in sorted(fs.find(run_path)):
        rel = key[len(prefix):] if key.startswith(prefix) else None
        parts = rel.split("/") if rel else []
        if not parts or parts[0] == "checkpoints" or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            continue
        dest = local_run.joinpath(*parts)
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(key, str(dest))
