"""End-to-end: a team shares results through DVC remote storage, with the real dvc and git commands.

Clone A, a copy of the small-data pipeline reproduced once per test worker (conftest `pipeline`), pushes to a local
folder remote and a bare git `origin`; every test then clones `origin` into a fresh folder and pulls what it needs, so a test needs
no other test to have run. The experiment a fixture runs in A is undone in A's workspace afterwards.
"""

import hashlib
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from .e2e import ENV, git_clone, repo_clone, sh

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("remote")]  # one worker, one `pipeline` (conftest)

# a new value for `-S`: not the small-data default lr (0.05), so the experiment trains
LR_SHARED = 0.04
EXP_NAME = "shared-lr"
CACHED = "Stage '{}' is cached - skipping run, checking out outputs"  # DVC's words (dvc/stage/cache.py)

# the credentials moto takes (it checks none); kept in .dvc/config.local, never in git
S3_KEY, S3_SECRET = "testing-key", "testing-secret"


@dataclass(frozen=True)
class Team:
    a: Path        # the clone that ran the pipeline
    origin: Path   # the bare git repository everyone pushes to and clones from
    storage: Path  # the DVC remote: a local (or NAS) folder


@pytest.fixture(scope="module")
def team(pipeline, tmp_path_factory) -> Team:
    """Clone A after `dvc repro`, with its results committed, pushed to `storage` and to `origin`."""
    base = tmp_path_factory.mktemp("remote")
    a = repo_clone(pipeline.repo, base / "a")
    storage = base / "storage"
    sh(a, "dvc", "remote", "add", "-d", "storage", str(storage))
    sh(a, "git", "add", ".dvc/config")
    sh(a, "git", "commit", "-qm", "the team's DVC remote")
    sh(a, "dvc", "push")
    origin = base / "origin.git"
    sh(base, "git", "init", "-q", "--bare", str(origin))
    sh(a, "git", "remote", "add", "origin", str(origin))
    sh(a, "git", "push", "-q", "origin", "HEAD")
    return Team(a, origin, storage)


def clone(team: Team, dest: Path, branch: str | None = None) -> Path:
    """A teammate's fresh clone of `origin`: the code, params, dvc.lock and metrics, none of the DVC outputs."""
    git_clone(team.origin, dest, *(["--branch", branch] if branch else []))
    sh(dest, "git", "config", "user.email", "b@example.com")  # dvc exp run commits to refs/exps
    sh(dest, "git", "config", "user.name", "b")
    return dest


@contextmanager
def experiment_in(repo: Path):
    """Run an experiment in ``repo``'s workspace, then put the workspace back at HEAD, outputs included."""
    try:
        yield
    finally:
        sh(repo, "git", "reset", "-q", "--hard")
        sh(repo, "dvc", "checkout", "-q")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def locked_outputs(repo: Path) -> tuple[dict[str, str], set[str]]:
    """Every file of every output in ``repo``'s dvc.lock (path -> md5, directories expanded from its cache),
    and the directory outputs."""
    files, folders = {}, set()
    for stage in yaml.safe_load((repo / "dvc.lock").read_text())["stages"].values():
        for out in stage.get("outs", []):
            md5 = out["md5"]
            if md5.endswith(".dir"):  # a directory output: its manifest lists relpath and md5 of each file
                folders.add(out["path"])
                manifest = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
                for entry in json.loads(manifest.read_text()):
                    files[f"{out['path']}/{entry['relpath']}"] = entry["md5"]
            else:
                files[out["path"]] = md5
    return files, folders


def files_under(repo: Path, folders: set[str]) -> set[str]:
    return {p.relative_to(repo).as_posix() for f in folders for p in (repo / f).rglob("*") if p.is_file()}


def in_storage(storage: Path, path: Path) -> bool:
    """Whether a DVC remote folder holds the bytes of ``path`` (DVC 3 lays objects out as files/md5/ab/cdef...)."""
    md5 = hashlib.md5(path.read_bytes()).hexdigest()
    return (storage / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def experiments(repo: Path) -> dict[str, dict]:
    """`dvc exp show --json` as experiment name -> its data (params, metrics)."""
    shown = json.loads(sh(repo, "dvc", "exp", "show", "--json").stdout)
    return {rev["name"]: rev["data"]
            for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]}


def assert_same_outputs(a: Path, b: Path) -> None:
    """``b`` holds every output file of ``a``'s dvc.lock with ``a``'s bytes, and nothing else in those folders."""
    locked, folders = locked_outputs(a)
    assert {"models/model.pt", "data/raw/train-images-idx3-ubyte.gz", "data/processed/train_images.npy",
            "metrics/train.json"} <= set(locked), sorted(locked)
    assert {"data/raw", "data/processed", "runs/train", "runs/sweep"} <= folders, folders
    for rel, md5 in locked.items():
        assert hashlib.md5((b / rel).read_bytes()).hexdigest() == md5, rel  # what dvc.lock records
        assert sha256(b / rel) == sha256(a / rel), rel                       # and A's bytes
    # files that .dvcignore keeps out of an output (the sweep's timing table) stay where they were made
    assert files_under(b, folders) == {rel for rel in locked if any(rel.startswith(f + "/") for f in folders)}


def test_a_clone_pulls_every_output_bit_for_bit_and_has_nothing_to_reproduce(team, tmp_path):
    b = clone(team, tmp_path / "b")
    assert not (b / "models" / "model.pt").exists() and not (b / "data" / "raw").exists()  # git alone carries none
    pulled = sh(b, "dvc", "pull")
    assert "fetched" in pulled.stdout, pulled.stdout
    assert_same_outputs(team.a, b)

    repro = sh(b, "dvc", "repro").stdout
    assert "Data and pipelines are up to date." in repro and "Running stage" not in repro, repro
    for stage in yaml.safe_load((b / "dvc.yaml").read_text())["stages"]:
        assert f"Stage '{stage}' didn't change, skipping" in repro, repro
    assert sh(b, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."
    assert "in sync" in sh(b, "dvc", "status", "--cloud").stdout
    assert sh(b, "git", "status", "--porcelain").stdout == ""


STANDALONE = """
import sys
sys.modules["fmnist"] = None  # any import of this package now fails
import numpy, torch
program = torch.export.load(sys.argv[1]).module()
numpy.save(sys.argv[3], program(torch.from_numpy(numpy.load(sys.argv[2]))).detach().numpy())
"""


def test_the_model_artifact_is_fetched_by_name_from_the_repository_and_runs_without_this_package(team, tmp_path):
    import numpy as np
    import torch

    from fmnist.checkpoint import load_checkpoint
    from fmnist.export import Standalone

    # a release is a Git tag in GTO's format, as `gto register` or DVC Studio make it
    sh(team.a, "git", "tag", "-a", "fashion-classifier@v1.0.0", "-m", "the first release")
    sh(team.a, "git", "push", "-q", "origin", "fashion-classifier@v1.0.0")
    b = clone(team, tmp_path / "b")  # a teammate's clone: git only, no DVC output
    got = tmp_path / "elsewhere" / "classifier.pt2"
    sh(b, "dvc", "artifacts", "get", str(team.origin), "fashion-classifier", "-o", str(got))
    assert sha256(got) == sha256(team.a / "models" / "model.pt2")
    images = np.load(team.a / "data" / "processed" / "test_images.npy")
    assert len(images) == 10_000
    np.save(tmp_path / "images.npy", images)
    # a Python that cannot import this package, in a folder with nothing of ours
    sh(got.parent, sys.executable, "-I", "-c", STANDALONE, str(got), str(tmp_path / "images.npy"),
       str(tmp_path / "logits.npy"))
    model, info = load_checkpoint(team.a / "models" / "model.pt", "cpu")
    with torch.no_grad():
        expected = Standalone(model, info["normalize"]["mean"], info["normalize"]["std"])(torch.from_numpy(images))
    assert (torch.from_numpy(np.load(tmp_path / "logits.npy")) - expected).abs().max() <= 1e-5


@dataclass(frozen=True)
class Shared:
    model: str                 # the experiment's checkpoint, its SHA-256
    model_md5: str             # and its MD5, the name of its object in a DVC cache
    results: dict[str, bytes]  # its metrics files


@pytest.fixture(scope="module")
def shared(team) -> Shared:
    """An experiment in A (a new lr), shared both ways a team shares one, as docs/sharing.md shows them: its
    run records and outputs pushed with `dvc push --run-cache`, then the experiment to `origin`."""
    with experiment_in(team.a):
        sh(team.a, "dvc", "exp", "run", "-n", EXP_NAME, "-S", f"lr={LR_SHARED}")
        model = sha256(team.a / "models" / "model.pt")
        model_md5 = hashlib.md5((team.a / "models" / "model.pt").read_bytes()).hexdigest()
        results = {name: (team.a / name).read_bytes() for name in ("metrics/train.json", "metrics/eval.json")}
        assert not in_storage(team.storage, team.a / "models" / "model.pt")
        sh(team.a, "dvc", "push", "--run-cache")
        assert in_storage(team.storage, team.a / "models" / "model.pt")  # the outputs went with the records
        pushed = sh(team.a, "dvc", "exp", "push", "origin", EXP_NAME)
        assert "Pushed experiment" in pushed.stdout and EXP_NAME in pushed.stdout, pushed.stdout
        assert "refs/exps/" in sh(team.a, "git", "ls-remote", "origin", "refs/exps/*").stdout  # its git ref
    return Shared(model, model_md5, results)


def test_a_shared_run_cache_restores_training_in_another_clone(team, shared, tmp_path):
    b = clone(team, tmp_path / "b")
    # why docs/sharing.md says --pull: `dvc pull --run-cache` brings the run records, not the outputs they
    # name, and DVC restores a stage from a record only when those are in the local cache
    sh(b, "dvc", "pull", "--run-cache")
    assert list((b / ".dvc" / "cache" / "runs").rglob("*")), "dvc pull --run-cache brought no run records"
    assert not (b / ".dvc" / "cache" / "files" / "md5" / shared.model_md5[:2] / shared.model_md5[2:]).exists()
    out = sh(b, "dvc", "exp", "run", "--pull", "-S", f"lr={LR_SHARED}").stdout
    # restored, not trained: every output of train is in DVC's cache (dvc.yaml); evaluate, whose
    # results go to git, reruns from the restored checkpoint and gives A's bytes
    assert "Running stage 'train'" not in out and CACHED.format("train") in out, out
    assert "Running stage 'evaluate'" in out, out
    assert sha256(b / "models" / "model.pt") == shared.model
    assert {name: (b / name).read_bytes() for name in shared.results} == shared.results


def test_an_experiment_pushed_to_origin_is_listed_applied_and_checked_out_in_another_clone(team, shared, tmp_path):
    b = clone(team, tmp_path / "b")
    assert EXP_NAME not in experiments(b)
    sh(b, "dvc", "exp", "pull", "origin", EXP_NAME)  # the git ref from origin and its outputs from storage
    shown = experiments(b)[EXP_NAME]
    metrics = json.loads(shared.results["metrics/eval.json"])
    assert shown["params"]["params.yaml"]["data"]["lr"] == LR_SHARED
    assert shown["metrics"]["metrics/eval.json"]["data"]["test_accuracy"] == metrics["test_accuracy"]

    sh(b, "dvc", "exp", "apply", EXP_NAME)
    assert sha256(b / "models" / "model.pt") == shared.model
    assert json.loads((b / "metrics" / "eval.json").read_text()) == metrics
    assert yaml.safe_load((b / "params.yaml").read_text())["lr"] == LR_SHARED
    status = sh(b, "dvc", "status").stdout
    assert status.strip() == "Data and pipelines are up to date.", status  # nothing to rerun, nothing missing


@pytest.fixture
def s3_endpoint(monkeypatch, tmp_path):
    """An S3-compatible server (moto) on a free localhost port, with a bucket; stopped after the test.

    The dvc commands see no AWS credentials, profile or instance metadata of the machine's own, so the
    only credentials are those a test gives DVC."""
    boto3 = pytest.importorskip("boto3")
    server_module = pytest.importorskip("moto.server", reason="needs moto[server] (pip install -e '.[dev]')")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
                "AWS_DEFAULT_PROFILE"):
        monkeypatch.delitem(ENV, var, raising=False)
    monkeypatch.setitem(ENV, "AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setitem(ENV, "AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setitem(ENV, "AWS_EC2_METADATA_DISABLED", "true")  # no credential look-up over the network
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1",
                          aws_access_key_id=S3_KEY, aws_secret_access_key=S3_SECRET)
        s3.create_bucket(Bucket="fmnist")
        yield url, s3
    finally:
        server.stop()


def test_an_s3_remote_round_trips_every_output_with_credentials_kept_out_of_git(team, s3_endpoint, tmp_path):
    pytest.importorskip("dvc_s3", reason="needs dvc-s3 (pip install -e '.[s3]')")
    url, s3 = s3_endpoint

    def credentials(repo: Path) -> None:
        sh(repo, "dvc", "remote", "modify", "--local", "s3", "access_key_id", S3_KEY)
        sh(repo, "dvc", "remote", "modify", "--local", "s3", "secret_access_key", S3_SECRET)

    branch = sh(team.a, "git", "branch", "--show-current").stdout.strip()
    sh(team.a, "git", "switch", "-q", "-c", "s3-remote")  # the move to S3, on a branch: other tests keep `storage`
    try:
        sh(team.a, "dvc", "remote", "add", "-d", "s3", "s3://fmnist/dvc")
        sh(team.a, "dvc", "remote", "modify", "s3", "endpointurl", url)
        credentials(team.a)
        sh(team.a, "git", "add", ".dvc/config")
        sh(team.a, "git", "commit", "-qm", "S3 remote")
        assert S3_SECRET not in (team.a / ".dvc" / "config").read_text()
        assert S3_SECRET in (team.a / ".dvc" / "config.local").read_text()
        assert sh(team.a, "git", "check-ignore", ".dvc/config.local").returncode == 0  # git never takes it
        pushed = sh(team.a, "dvc", "push")
        assert "pushed" in pushed.stdout, pushed.stdout
        sh(team.a, "git", "push", "-q", "origin", "s3-remote")
    finally:
        (team.a / ".dvc" / "config.local").unlink(missing_ok=True)  # it names a remote only the branch defines
        sh(team.a, "git", "switch", "-q", branch)
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket="fmnist")
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert keys and all(k.startswith("dvc/files/md5/") for k in keys), keys[:5]

    b = clone(team, tmp_path / "b", branch="s3-remote")
    assert sh(b, "dvc", "remote", "default").stdout.strip() == "s3"
    denied = sh(b, "dvc", "pull", check=False)  # the clone has the URL from git, not the credentials
    assert denied.returncode != 0 and "Unable to locate credentials" in denied.stderr, denied.stderr
    credentials(b)
    sh(b, "dvc", "pull")
    assert_same_outputs(team.a, b)
    assert "in sync" in sh(b, "dvc", "status", "--cloud").stdout
