"""Files in local directories and in object storage (a real S3 server on loopback), and checkpoints on both."""

import json

import pytest

from actors.storage import Location, fetch, is_uri
from jobs.bench.s3 import BUCKET
from orchestrator import rundir
from orchestrator.rundir import RunDir, locate_lora, resolve_lora_dir


def test_files_and_trees_round_trip(root, tmp_path):
    (root / "a" / "b.txt").write_text("hello")
    assert (root / "a" / "b.txt").read_text() == "hello" and (root / "a").is_dir() and (root / "a" / "b.txt").is_file()
    assert root.list() == ["a"] and (root / "missing").list() == [] and not (root / "missing").exists()
    tree = tmp_path / "tree"
    (tree / "x").mkdir(parents=True)
    (tree / "x" / "w.bin").write_bytes(b"\0\1\2")
    (tree / "y.json").write_text("{}")
    (root / "up").upload(tree)
    assert (root / "up").list() == ["x", "y.json"] and (root / "up" / "x" / "w.bin").read_bytes() == b"\0\1\2"
    back = (root / "up").download(tmp_path / "back")
    assert sorted(p.relative_to(back).as_posix() for p in back.rglob("*")) == ["x", "x/w.bin", "y.json"]
    (root / "up").delete()
    assert not (root / "up").exists()
    (root / "up").delete()  # deleting what is not there is no error


def test_writing_dir_ends_up_in_storage_and_as_local_dir_reads_it(root):
    with (root / "ckpt").writing_dir() as local:
        (local / "rank0.pt").write_bytes(b"zero")
    with (root / "ckpt").writing_dir() as local:  # a second writer (another rank) adds its own file
        (local / "rank1.pt").write_bytes(b"one")
    assert (root / "ckpt").list() == ["rank0.pt", "rank1.pt"]
    with (root / "ckpt").as_local_dir() as local:
        assert (local / "rank1.pt").read_bytes() == b"one"


def test_a_uri_is_fetched_once_per_node(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path / "cache"))
    model = Location(f"s3://{BUCKET}/models/m1")
    (model / "model_index.json").write_text("{}")
    local = fetch(model, "models")
    assert local.name == "m1" and (local / "model_index.json").read_text() == "{}" and str(tmp_path / "cache") in str(local)
    model.delete()  # the cached copy is used from now on: nothing is downloaded again
    assert fetch(model, "models") == local and (local / "model_index.json").is_file()
    assert fetch(tmp_path, "models") == tmp_path and not is_uri(tmp_path) and is_uri("gs://b/k")


def test_checkpoints_are_complete_only_once_marked(root):
    run = RunDir(root)
    for epoch in (1, 2, 3):
        checkpoint = rundir.begin_checkpoint(run, epoch)
        checkpoint.state.write_text(json.dumps({"epoch": epoch}))
        rundir.commit_checkpoint(run, checkpoint, keep=2)
    assert [c.name for c in run.complete_checkpoints()] == ["epoch_0002", "epoch_0003"]  # keep=2 pruned epoch 1
    assert not run.checkpoint(1).location.exists()
    # A write killed before its marker is ignored, and `latest` keeps naming the last complete one.
    half = rundir.begin_checkpoint(run, 4)
    half.state.write_text(json.dumps({"epoch": 4}))
    assert run.latest_checkpoint().read_state() == {"epoch": 3}
    # Rewriting an epoch clears it first, marker first: it is never complete while half new.
    again = rundir.begin_checkpoint(run, 3)
    assert not again.is_complete() and not again.location.exists()
    assert run.latest_checkpoint().name == "epoch_0002"  # `latest` names epoch 3, which is incomplete now


def test_an_adapter_of_a_run_in_object_storage_is_fetched_with_its_epoch(s3, tiny_pipeline_dir, tmp_path, monkeypatch):
    from actors.diffusion.generator import adapter_version
    from tests.helpers.adapters import make_adapter

    monkeypatch.setenv("RAYALIGN_CACHE", str(tmp_path / "cache"))
    run = RunDir(f"s3://{BUCKET}/runs/adapter")
    checkpoint = rundir.begin_checkpoint(run, 7)
    checkpoint.lora.upload(make_adapter(tiny_pipeline_dir, tmp_path / "adapter", seed=1))
    rundir.commit_checkpoint(run, checkpoint, keep=2)
    assert locate_lora(run.root.uri) == checkpoint.lora
    local = resolve_lora_dir(run.root.uri)
    assert local.parent.name == "epoch_0007" and adapter_version(local).startswith("epoch_0007@")


@pytest.mark.parametrize(
    "change, words",
    [
        ({"uri": "s3://no-such-bucket-rayalign/x"}, "bucket 'no-such-bucket-rayalign' does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong"}, "the storage refused the credentials"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot reach the storage endpoint http://127.0.0.1:9"),
    ],
)
def test_storage_errors_name_the_uri_and_what_failed(s3, monkeypatch, change, words):
    uri = change.pop("uri", f"s3://{BUCKET}/errors/file.txt")
    for name, value in change.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as caught:
        Location(uri).write_text("x")
    assert words in str(caught.value) and uri in str(caught.value)
    with pytest.raises(ValueError, match="bucket|credentials|endpoint"):
        Location(uri).exists()
