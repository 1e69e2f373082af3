"""Checkpoints on object storage (issue 17 scope 2, trainrun.storage).

Unit tests run the upload/fetch logic in-process against fsspec's memory:// filesystem (no server); the end-to-end
tests run the CLI against a real S3 API served on localhost by moto's server mode (started and stopped here): a run
writes its checkpoints to the bucket with the pointer last, a kill -9 mid-upload leaves the bucket's latest on the
previous complete checkpoint, and a resume from the bucket in a clean directory ends SHA-equal to the uninterrupted
run (three trainrun processes in all).
"""
import hashlib
import logging
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

import conftest
from conftest import FAST
from trainrun import checkpoint, storage
from trainrun.errors import CheckpointError, ConfigError


# --- unit: memory:// --------------------------------------------------------------------------------------------

@pytest.fixture
def memory_run(tmp_path, monkeypatch):
    """A staging run directory mirroring memory://<fresh bucket>/runs/r (the working directory is tmp_path)."""
    from fsspec.implementations.memory import MemoryFileSystem

    monkeypatch.chdir(tmp_path)
    bucket = f"bkt-{uuid.uuid4().hex[:8]}"
    url = f"memory://{bucket}/runs/r"
    run_dir = storage.staging_dir(url)
    run_dir.mkdir(parents=True)
    yield url, run_dir, MemoryFileSystem(), f"/{bucket}/runs/r"
    storage._MIRRORS.pop(url, None)
    storage._FETCHED.clear()
    MemoryFileSystem().rm(f"/{bucket}", recursive=True)


def _save(run_dir, step, metric=None, keep_last=1):
    state = {"w": torch.arange(4, dtype=torch.float32) * step, "step": step}
    return checkpoint.save(run_dir, step, state, {"config": {}}, keep_last=keep_last, metric=metric)


def _complete(fs, run_path, name) -> bool:
    """Whether the store holds checkpoint `name` whole: an upload record whose every file has its SHA256."""
    try:
        record = storage.parse_record(fs.cat_file(f"{run_path}/checkpoints/{name}/{storage.RECORD}"))
    except FileNotFoundError:
        return False
    return record is not None and all(
        hashlib.sha256(fs.cat_file(f"{run_path}/checkpoints/{name}/{rel}")).hexdigest() == sha
        for rel, sha in record.items())


def test_staging_paths_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("s3://bucket/prefix/run", "memory://b/runs/x", "file:///tmp/store/runs/x", "gs://b/r"):
        assert storage.remote_of(storage.staging_dir(url)) == url
    assert storage.local_root("runs") == Path("runs")  # a plain path: unchanged
    assert storage.local_root("s3://b/p") == Path(".trainrun/remote/s3/b/p")
    assert storage.remote_of(tmp_path / "runs" / "x") is None
    assert storage.remote_of(storage.staging_dir("s3://b/p/r") / "checkpoints" / ".badstep-3-1") is None
    for bad, why in (("s3://", "names no bucket"), ("s3://b/../x", "'..' is not a plain folder name")):
        with pytest.raises(ConfigError, match=re.escape(why)):
            storage.staging_dir(bad)


def test_upload_order_pointer_names_a_verified_checkpoint(memory_run, monkeypatch):
    """Each checkpoint's files go up before its manifest, the record after every file verified, the pointer last;
    whenever a pointer is written, the checkpoint it names is complete in the store. Retention deletes the record
    of a removed checkpoint before its files."""
    url, run_dir, fs, run_path = memory_run
    cls = type(fs)
    events = []
    real_put, real_pipe, real_rm_file = cls.put_file, cls.pipe_file, cls.rm_file

    def put_file(self, lpath, rpath, *a, **k):
        events.append(("put", rpath[len(run_path) + 1:]))
        return real_put(self, lpath, rpath, *a, **k)

    def pipe_file(self, path, value, *a, **k):
        rel = path[len(run_path) + 1:]
        if rel in ("checkpoints/latest", "checkpoints/best"):
            assert _complete(self, run_path, value.decode().strip()), f"{rel} -> an incomplete checkpoint"
        events.append(("pipe", rel))
        return real_pipe(self, path, value, *a, **k)

    def rm_file(self, path, *a, **k):
        events.append(("rm", path[len(run_path) + 1:]))
        return real_rm_file(self, path, *a, **k)

    monkeypatch.setattr(cls, "put_file", put_file)
    monkeypatch.setattr(cls, "pipe_file", pipe_file)
    monkeypatch.setattr(cls, "rm_file", rm_file)
    _save(run_dir, 2, metric=0.5)
    first = [e for e in events if "step_" in e[1] or "checkpoints/" in e[1]]
    s2 = "checkpoints/step_000000002"
    assert first == [("put", f"{s2}/meta.json"), ("put", f"{s2}/state.pt"), ("put", f"{s2}/state.pt.sha256"),
                     ("pipe", f"{s2}/{storage.RECORD}"), ("pipe", "checkpoints/latest"), ("pipe", "checkpoints/best")]
    events.clear()
    _save(run_dir, 4, metric=0.4)  # worse: best stays on step 2; keep_last=1 removes nothing that best names
    _save(run_dir, 6, metric=0.9)  # better: best moves, step 2 and 4 go (locally, then in the store)
    assert fs.cat_file(f"{run_path}/checkpoints/latest") == b"step_000000006\n"
    assert fs.cat_file(f"{run_path}/checkpoints/best") == b"step_000000006\n"
    assert storage.remote_checkpoints(fs, run_path) == ["step_000000006"]
    i_pointer = events.index(("pipe", "checkpoints/best"), events.index(("pipe", "checkpoints/step_000000006/"
                                                                                  f"{storage.RECORD}")))
    i_unrecord = events.index(("rm", f"checkpoints/step_000000002/{storage.RECORD}"))
    assert i_pointer < i_unrecord  # deletions only after the pointers moved off the removed checkpoints
    assert fs.cat_file(f"{run_path}/checkpoints/step_000000006/state.pt") == \
        (run_dir / "checkpoints/step_000000006/state.pt").read_bytes()


def test_corrupted_upload_is_refused_and_latest_stays(memory_run, monkeypatch):
    url, run_dir, fs, run_path = memory_run
    _save(run_dir, 2)
    cls = type(fs)
    real_put = cls.put_file

    def flip_a_byte(self, lpath, rpath, *a, **k):
        real_put(self, lpath, rpath, *a, **k)
        if rpath.endswith("state.pt"):
            data = bytearray(self.cat_file(rpath))
            data[-1] ^= 1
            self.pipe_file(rpath, bytes(data))

    monkeypatch.setattr(cls, "put_file", flip_a_byte)
    with pytest.raises(CheckpointError, match="the upload was corrupted; the store's latest still names the previous"):
        _save(run_dir, 4)
    assert fs.cat_file(f"{run_path}/checkpoints/latest") == b"step_000000002\n"
    assert not fs.exists(f"{run_path}/checkpoints/step_000000004/{storage.RECORD}")


def test_the_next_process_uploads_a_checkpoint_the_store_missed(memory_run):
    """Killed during the upload of step 4, continued from the staging copy (which holds step 4 whole): the next
    process's first upload brings step 4 to the store too, before it moves the pointer."""
    url, run_dir, fs, run_path = memory_run
    _save(run_dir, 2, keep_last=3)
    _save(run_dir, 4, keep_last=3)
    fs.rm_file(f"{run_path}/checkpoints/step_000000004/{storage.RECORD}")
    fs.rm_file(f"{run_path}/checkpoints/step_000000004/state.pt")
    fs.pipe_file(f"{run_path}/checkpoints/latest", b"step_000000002\n")
    storage._MIRRORS.clear()  # a new process
    _save(run_dir, 6, keep_last=3)
    assert all(_complete(fs, run_path, f"step_00000000{step}") for step in (2, 4, 6))
    assert fs.cat_file(f"{run_path}/checkpoints/latest") == b"step_000000006\n"


def test_a_sharded_checkpoints_files_round_trip(memory_run, tmp_path, monkeypatch):
    """Every file of the folder travels, subfolders and hidden files too (checkpoint.format=sharded keeps DCP's
    dcp/.metadata beside its shards)."""
    url, run_dir, fs, run_path = memory_run
    folder = run_dir / "checkpoints" / "step_000000004"
    files = {"meta.json": b"{}", "state.pt": b"state", "state.pt.sha256": b"manifest", "dcp/.metadata": b"index",
             "dcp/__0_0.distcp": b"shard 0", "dcp/__1_0.distcp": b"shard 1"}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    storage.mirror(run_dir).upload_checkpoint(folder)
    assert _complete(fs, run_path, "step_000000004")
    elsewhere = tmp_path / "elsewhere"  # another machine's working directory
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    fetched = storage.fetch(f"{url}/checkpoints/step_000000004")
    assert {p.relative_to(fetched).as_posix(): p.read_bytes() for p in fetched.rglob("*") if p.is_file()} == files


def test_resuming_an_older_checkpoint_by_url_branches_in_the_bucket(memory_run, tmp_path, monkeypatch):
    """The staging copy of a clean directory holds only the checkpoint named, so the store says whether it is the
    newest: an older one branches (a new run beside it in the bucket), the newest continues the run."""
    from trainrun.cli import _pick_run_dir

    url, run_dir, fs, run_path = memory_run
    _save(run_dir, 2, keep_last=5)
    _save(run_dir, 4, keep_last=5)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    older = _pick_run_dir("train", f"{url}/checkpoints/step_000000002", "runs", None)
    assert Path(older).parent.resolve() == storage.staging_dir(url).parent.resolve()
    assert Path(older).name.startswith("r-from-step_000000002-")
    assert storage.remote_of(Path(older)).startswith(url + "-from-step_000000002-")
    newest = _pick_run_dir("train", f"{url}/checkpoints/step_000000004", "runs", None)
    assert Path(newest).resolve() == storage.staging_dir(url).resolve()


def test_fetch_takes_the_newest_verified_checkpoint(memory_run, tmp_path, monkeypatch, caplog):
    """A folder without its record (an upload killed half-way) and one whose file does not match its record are
    skipped; the newest whole one is downloaded, with best and the run's files, into a clean working directory."""
    url, run_dir, fs, run_path = memory_run
    _save(run_dir, 2, metric=0.9, keep_last=5)
    _save(run_dir, 4, metric=0.1, keep_last=5)
    _save(run_dir, 6, metric=0.2, keep_last=5)
    _save(run_dir, 8, metric=0.3, keep_last=5)
    (run_dir / "metrics.jsonl").write_text('{"step": 8}\n')
    storage.sync_run(run_dir)
    fs.rm_file(f"{run_path}/checkpoints/step_000000008/{storage.RECORD}")  # killed before its record
    fs.pipe_file(f"{run_path}/checkpoints/step_000000006/state.pt", b"not the bytes uploaded")
    clean = tmp_path / "clean"
    clean.mkdir()
    monkeypatch.chdir(clean)
    with caplog.at_level(logging.WARNING, logger="trainrun"):
        local = checkpoint.candidates(url, "runs")
    assert [p.name for p in local] == ["step_000000004", "step_000000002"]  # the newest verified, and best
    assert "step_000000008: no upload record" in caplog.text
    assert "step_000000006: state.pt does not match" in caplog.text
    state, meta = checkpoint.load(local[0])
    assert torch.equal(state["w"], torch.arange(4, dtype=torch.float32) * 4)
    staged = storage.staging_dir(url)
    assert checkpoint.read_pointer(staged, "best").name == "step_000000002"
    assert (staged / "metrics.jsonl").read_text() == '{"step": 8}\n'
    storage._FETCHED.clear()
    fs.rm_file(f"{run_path}/checkpoints/step_000000004/{storage.RECORD}")
    fs.rm_file(f"{run_path}/checkpoints/step_000000002/{storage.RECORD}")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint in the store"):
        storage.fetch(url)


def test_url_errors_are_one_line(monkeypatch):
    import fsspec

    with pytest.raises(ConfigError, match=r"output_root=foo://b/x: fsspec has no implementation of foo://"):
        storage.check_remote("foo://b/x")

    def without_s3fs(protocol):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec, "get_filesystem_class", without_s3fs)
    with pytest.raises(ConfigError, match=re.escape("output_root=s3://b/x: s3:// needs a package that is not "
                                                    "installed: pip install 'trainrun[s3]'")):
        storage.check_remote("s3://b/x")


# --- end to end: moto's S3 server on localhost --------------------------------------------------------------------

class _Requests(logging.Handler):
    """The S3 requests the server answered, in order: (method, key)."""

    LINE = re.compile(r'"(PUT|GET|HEAD|DELETE|POST) /([^ ?]*)[^"]*" (\d+)')

    def __init__(self):
        super().__init__()
        self.seen = []

    def emit(self, record):
        m = self.LINE.search(re.sub(r"\x1b\[[0-9;]*m", "", record.getMessage()))  # werkzeug colours some lines
        if m:
            self.seen.append((m.group(1), m.group(2), m.group(3)))


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free localhost port, with the bucket `bkt`; the environment a trainrun process needs
    to reach it (this process's own environment is left alone: the suite's other CLI tests keep theirs)."""
    s3fs = pytest.importorskip("s3fs")
    ThreadedMotoServer = pytest.importorskip("moto.server").ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    requests = _Requests()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.addHandler(requests)
    old_level, werkzeug.level = werkzeug.level, logging.INFO
    fs = s3fs.S3FileSystem(endpoint_url=env["AWS_ENDPOINT_URL"], key="testing", secret="testing",
                           skip_instance_cache=True)
    fs.mkdir("bkt")
    try:
        yield env, fs, requests
    finally:
        werkzeug.removeHandler(requests)
        werkzeug.setLevel(old_level)
        server.stop()


def _trainrun(cwd: Path, env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, with the store's environment. The test suite's pre-imported process
    (tests/_zygote.py) serves it when it runs: the child takes the request's whole environment before anything
    reads the AWS variables (s3fs/botocore are imported and read them only when a URL is used)."""
    base = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}  # what conftest.run_cli passes
    env = {**base, **env_extra}
    zygote = getattr(conftest, "_ZYGOTE", None)
    if zygote is not None and zygote.serves(base):
        return zygote.run({"module": "trainrun", "args": list(args)}, cwd, env, 600)
    return subprocess.run([sys.executable, "-m", "trainrun", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


RUN = ["model=mlp", "trainer.max_steps=8", "trainer.ckpt_every=2", "trainer.eval_every=4", *FAST]


def _state_sha(fs, run_key: str, name: str) -> str:
    return fs.cat_file(f"{run_key}/checkpoints/{name}/state.pt.sha256").decode().split()[0]


@pytest.fixture(scope="module")
def uninterrupted(s3, tmp_path_factory):
    env, fs, requests = s3
    requests.seen.clear()
    p = _trainrun(tmp_path_factory.mktemp("full"), env, "output_root=s3://bkt/full", "run_name=r", *RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    return list(requests.seen)


def test_run_writes_checkpoints_to_the_bucket_pointer_last(s3, uninterrupted):
    env, fs, _ = s3
    fs.invalidate_cache()
    run_key = "bkt/full/r"
    assert fs.cat_file(f"{run_key}/checkpoints/latest") == b"step_000000008\n"
    assert storage.remote_checkpoints(fs, run_key) == ["step_000000006", "step_000000008"]  # keep_last=2
    for name in ("step_000000006", "step_000000008"):
        assert _complete(fs, run_key, name)
    for rel in ("config.yaml", "metrics.jsonl"):
        assert fs.exists(f"{run_key}/{rel}")
    puts = [key[len(run_key) + 1:] for method, key, status in uninterrupted
            if method == "PUT" and key.startswith(run_key) and status.startswith("2")]
    for step in (2, 4, 6, 8):
        name = f"checkpoints/step_{step:09d}"
        files = [i for i, k in enumerate(puts) if k.startswith(name + "/")]
        pointer = puts.index("checkpoints/latest", files[-1])
        assert [puts[i].rsplit("/", 1)[1] for i in files] == ["meta.json", "state.pt", "state.pt.sha256",
                                                               storage.RECORD]
        assert all(i < pointer for i in files)
        assert "checkpoints/latest" not in puts[files[0]:files[-1]]  # no pointer move in the middle of an upload
    gets = {key for method, key, _ in uninterrupted if method == "GET"}
    assert f"{run_key}/checkpoints/step_000000008/state.pt" in gets  # verified by reading the stored bytes back


def test_kill_mid_upload_then_resume_from_the_bucket_is_sha_equal(s3, uninterrupted, tmp_path):
    env, fs, _ = s3
    run_key = "bkt/killed/r"
    first = tmp_path / "first"
    first.mkdir()
    p = _trainrun(first, {**env, storage.KILL_AFTER_ENV: "step_000000006/state.pt"},
                  "output_root=s3://bkt/killed", "run_name=r", *RUN)
    assert p.returncode == -9, p.stderr[-3000:]
    fs.invalidate_cache()
    assert fs.exists(f"{run_key}/checkpoints/step_000000006/state.pt")  # half uploaded ...
    assert not fs.exists(f"{run_key}/checkpoints/step_000000006/{storage.RECORD}")
    assert fs.cat_file(f"{run_key}/checkpoints/latest") == b"step_000000004\n"  # ... and not pointed at
    assert _complete(fs, run_key, "step_000000004")

    clean = tmp_path / "clean"  # another machine: nothing of the run on its disk
    clean.mkdir()
    p = _trainrun(clean, env, "resume=s3://bkt/killed/r", *FAST)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped an incomplete checkpoint in the store: step_000000006" in p.stdout + p.stderr
    fs.invalidate_cache()
    assert fs.cat_file(f"{run_key}/checkpoints/latest") == b"step_000000008\n"
    assert _complete(fs, run_key, "step_000000008")
    assert _state_sha(fs, run_key, "step_000000008") == _state_sha(fs, "bkt/full/r", "step_000000008")
    assert fs.cat_file(f"{run_key}/checkpoints/step_000000008/state.pt") == \
        fs.cat_file("bkt/full/r/checkpoints/step_000000008/state.pt")
    local = clean / storage.staging_dir("s3://bkt/killed/r")
    assert conftest.sha_of(local, 8) == _state_sha(fs, "bkt/full/r", "step_000000008")


def test_store_problems_are_one_line_before_compute(s3, monkeypatch):
    env, fs, _ = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"output_root=s3://nobucket/runs: the bucket 'nobucket' does not exist"):
        storage.check_remote("s3://nobucket/runs")
    with pytest.raises(ConfigError, match=r"resume=s3://nobucket/runs/r: the bucket 'nobucket' does not exist"):
        checkpoint.candidates("s3://nobucket/runs/r", "runs")
    fs.pipe_file("bkt/taken/r/checkpoints/step_000000002/meta.json", b"{}")  # an unfinished upload: no checkpoint
    storage.check_new_run("s3://bkt/taken/r")
    fs.pipe_file(f"bkt/taken/r/checkpoints/step_000000002/{storage.RECORD}", b"")
    with pytest.raises(ConfigError, match=r"run directory s3://bkt/taken/r already has checkpoints in the store "
                                          r"\(step_000000002 is the newest\); continue it with "
                                          r"resume=s3://bkt/taken/r"):
        storage.check_new_run("s3://bkt/taken/r")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(ConfigError, match=r"no credentials for the store .*set AWS_ACCESS_KEY_ID and "
                                          r"AWS_SECRET_ACCESS_KEY"):
        storage.check_remote("s3://bkt/runs")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(ConfigError, match=r"cannot reach the store at AWS_ENDPOINT_URL=http://127.0.0.1:9"):
        storage.check_remote("s3://bkt/runs")


def test_the_cli_refuses_in_one_line_before_hydra(s3, tmp_path, monkeypatch, capsys):
    """The preflight (in-process, as `trainrun` runs it before Hydra): one `trainrun: error:` line, exit 2, nothing
    written in the working directory."""
    from trainrun.cli import preflight, setup

    env, fs, _ = s3
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    setup()
    fs.pipe_file(f"bkt/taken/r/checkpoints/step_000000002/{storage.RECORD}", b"")

    def refusal(*overrides, sweep=False) -> str:
        with pytest.raises(SystemExit) as e:
            preflight(list(overrides), sweep=sweep)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err.startswith("trainrun: error: ") and "\n" not in err, err
        return err

    assert "output_root=foo://b/x: fsspec has no implementation" in refusal("output_root=foo://b/x")
    assert "the bucket 'nobucket' does not exist" in refusal("output_root=s3://nobucket/x")
    assert "already has checkpoints in the store" in refusal("output_root=s3://bkt/taken", "run_name=r")
    assert "resume=s3://bkt/nothing/here: no complete checkpoint" in refusal("resume=s3://bkt/nothing/here")
    assert "a -m sweep writes its jobs under multirun/" in refusal("output_root=s3://bkt/x", sweep=True)
    assert list(tmp_path.iterdir()) == []
