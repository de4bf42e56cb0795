"""The decay-free mode (``wsm.enabled``) on a run on object storage, and the DCP conversions with URL outputs, on
S3 (moto) and Azure Blob (Azurite): parametrized by store, one job per test and store (tiny model, 8 updates)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from integration_helpers import preempted_at
from wsd_pretrain.checkpoint import objread, objstore
from wsd_pretrain.checkpoint.manager import CheckpointManager
from wsd_pretrain.checkpoint.storage import parse_location, store_for
from wsd_pretrain.cli import main as cli

ROOT = Path(__file__).resolve().parent.parent
WSM = [
    "wsm.enabled=true",
    "wsm.window=2",
    "checkpoint.snapshot_every=1",
    "checkpoint.snapshot_keep=6",  # the window of 4 still there at 6: a lost merge at 4 is redone
    "schedule.total=8",
    "schedule.warmup=1",
    "schedule.milestones=[4,8]",
    "schedule.decay_length=2",
    "train.progress=false",
    "train.eval_every=100",
    "train.eval_batches=1",
    "train.micro_batch_size=2",
    "data.max_bytes=100000",
    "data.seq_len=16",
    "model.num_layers=1",
    "model.hidden_size=16",
    "model.intermediate_size=32",
    "model.num_heads=2",
    "model.num_kv_heads=1",
]
MERGES = ["merged/step-000000004-wsm", "merged/step-000000008-wsm"]


@pytest.fixture(params=["s3", "az"])
def root_url(request) -> str:
    """A new empty bucket (moto) or container (Azurite) as ``s3://b`` / ``az://c``."""
    if request.param == "s3":
        return f"s3://{request.getfixturevalue('s3_server').bucket()}"
    return f"az://{request.getfixturevalue('azure_server').container()}"


@pytest.fixture(scope="module")
def local_wsm(tmp_path_factory) -> Path:
    """The same job on a local run directory (once for both stores): the merges the bucket's must equal."""
    import os

    from wsd_pretrain import train

    local, cwd = tmp_path_factory.mktemp("wsm") / "local", os.getcwd()
    os.chdir(ROOT)  # the stdlib corpus and relative paths as a user's shell has them
    try:
        assert train.run(["--run-dir", str(local), *WSM])["position"] == 8
    finally:
        os.chdir(cwd)
    return local


def _objects(url: str) -> dict[str, bytes]:
    loc = parse_location(url)
    store = store_for(loc)
    objects, _ = store.list(loc.prefix)
    return {o["key"][len(loc.prefix) :]: store.get(o["key"])[0] for o in objects}


def test_wsm_on_a_bucket_merges_as_on_disk_and_resumes(root_url, local_wsm, tmp_path, monkeypatch, capsys):
    """The main job in the decay-free mode with ``--run-dir s3://...`` (and ``az://``): a first job with a staging
    folder (its merge reads the staging run's copies of the window's snapshots) is preempted at update 6, after the
    merge at 4; a second job on another machine (no staging folder, an empty log folder) resumes from the bucket and
    merges at 8 reading the snapshots in place, replacing what a killed run left there; a merge at 4 left without
    its config.json (killed mid-upload) is redone at the resume. Each merged folder on the
    bucket holds the same weight bytes as the same job's merge on disk, the metrics name them, they load with
    transformers, `ckpt list` shows them (a folder without its config.json as unfinished), and the bucket's
    checkpoints verify."""
    from wsd_pretrain import train

    monkeypatch.chdir(ROOT)
    local = local_wsm
    url = f"{root_url}/runs/wsm"
    remote_reads: list[str] = []
    real_init = objread.RemoteCheckpoint.__init__

    def spy(self, ckpt, manifest, **kw):
        remote_reads.append(ckpt.name)
        real_init(self, ckpt, manifest, **kw)

    monkeypatch.setattr(objread.RemoteCheckpoint, "__init__", spy)
    staging = tmp_path / "staging"
    staged = ["checkpoint.staging_keep=3", f"checkpoint.staging_dir={staging}"]
    with preempted_at(6):
        first = train.run(["--run-dir", url, *WSM, *staged])
    assert first["preempted"] and first["position"] == 6
    assert remote_reads == [], "the window's snapshots were read from the staging run's copies"
    # what a run killed after its merge at 8 (resumed from 6) leaves: the second job's merge at 8 replaces it whole
    loc = parse_location(url)
    stale = loc / MERGES[1]
    for rel in ("config.json", "model-00001-of-00002.safetensors"):
        store_for(loc).put((stale / rel).key, b"{}")
    # and a merge at 4 cut short before its config.json (a job killed mid-upload that resumes past 4): redone
    store_for(loc).delete([(loc / MERGES[0] / "config.json").key])
    second = train.run(["--run-dir", url, "--log-dir", str(tmp_path / "logs-b"), *WSM])
    assert second["position"] == 8 and not second["preempted"]
    # the resume read its checkpoint in place, then the merges the windows' snapshots: 4's again (catch-up), then 8's
    assert remote_reads == ["step-000000006-preempt", *(f"step-00000000{p}-snapshot" for p in (2, 3, 4, 6, 7, 8))]

    metrics = [json.loads(line) for line in store_for(loc).get((loc / "metrics.jsonl").key)[0].decode().splitlines()]
    assert [m["merged"] for m in metrics if "merged" in m] == MERGES
    for merged in MERGES:
        on_bucket, on_disk = (
            _objects(f"{url}/{merged}"),
            {
                p.relative_to(local / merged).as_posix(): p.read_bytes()
                for p in (local / merged).rglob("*")
                if p.is_file()
            },
        )
        assert set(on_bucket) == set(on_disk)
        same = [k for k in on_disk if k != "wsd_pretrain_merge.json"]  # the weights, their index, config.json
        assert "model.safetensors.index.json" in same and all(on_bucket[k] == on_disk[k] for k in same), merged
        info = json.loads(on_bucket["wsd_pretrain_merge.json"])
        early = merged == MERGES[0]
        assert [r["position"] for r in info["inputs"]] == ([2, 3, 4] if early else [6, 7, 8])
        assert [r["coefficient"] for r in info["inputs"]] == [
            r["coefficient"] for r in json.loads(on_disk["wsd_pretrain_merge.json"])["inputs"]
        ]
        assert all(r["path"].startswith(url) for r in info["inputs"]), info  # both read in place (4: its redo)
    assert not (staging / "merged" / "step-000000008-wsm").exists()
    out = tmp_path / "down"
    for rel, data in _objects(f"{url}/{MERGES[-1]}").items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.state_dict()["model.norm.weight"].dtype == torch.float32
    names = [i.name for i in objstore.list_run(loc) if i.state == "complete"]
    assert names == ["step-000000006-preempt", "step-000000008-final"], names
    assert cli(["ckpt", "verify", url]) == 0
    capsys.readouterr()
    for run in (url, str(local)):  # `ckpt list` shows the merged models after the checkpoints and snapshots
        assert cli(["ckpt", "list", run, "--json"]) == 0
        listed = [(i["name"], i["state"]) for i in json.loads(capsys.readouterr().out) if i["kinds"] == ["merged"]]
        assert listed == [(m.split("/")[1], "complete") for m in MERGES], (run, listed)
    store_for(loc).delete([(loc / MERGES[0] / "config.json").key])  # its commit object gone: unfinished
    assert cli(["ckpt", "list", url]) == 0
    assert "step-000000004-wsm" in (text := capsys.readouterr().out) and "unfinished" in text, text


def test_dcp_conversions_with_url_outputs(root_url, tmp_path, capsys, monkeypatch):
    """`ckpt to-dcp` from a URL into a URL (the DCP directory uploaded with `.metadata` last, read back by
    `from-dcp` once downloaded) and `ckpt from-dcp` into a URL (a Hugging Face folder, `config.json` last, holding
    the model's weights bit for bit); a non-empty prefix is refused before any work; a DCP input on a URL is
    refused naming a download."""
    from test_object_storage import CFG, _job, _step

    from wsd_pretrain.checkpoint.manager import CheckpointConfig

    run = f"{root_url}/runs/dcp"
    model, opt, sched = _job()
    mgr = CheckpointManager(run, model, opt, sched, config=CheckpointConfig(), hf_config=CFG.hf_config())
    while sched.position < 4:
        _step(model, opt, sched)
        mgr.maybe_save()
    mgr.close()
    dcp = f"{root_url}/dcp/pre"
    uploaded: list[str] = []
    real_stream = objstore.stream_file
    monkeypatch.setattr(objstore, "stream_file", lambda path, w: uploaded.append(path.name) or real_stream(path, w))
    assert cli(["ckpt", "to-dcp", run, dcp]) == 0
    assert uploaded[-1] == ".metadata" and len(uploaded) > 1, "DCP's readers open .metadata first: it goes last"
    assert cli(["ckpt", "to-dcp", run, dcp]) == 2  # not empty: refused
    objects = _objects(dcp)
    assert ".metadata" in objects and any(k.endswith(".distcp") for k in objects)
    down = tmp_path / "dcp-down"
    for rel, data in objects.items():
        (down / rel).parent.mkdir(parents=True, exist_ok=True)
        (down / rel).write_bytes(data)
    hf = f"{root_url}/hf/from-dcp"
    (tmp_path / "c.json").write_text(json.dumps(CFG.hf_config()))
    convert = ["ckpt", "from-dcp", str(down), hf, "--prefix", "model.", "--hf-config", str(tmp_path / "c.json")]
    uploaded.clear()
    assert cli(convert) == 0
    assert uploaded[-1] == "config.json" and len(uploaded) > 1, uploaded
    assert cli(convert) == 2  # not empty: refused
    folder = _objects(hf)
    assert json.loads(folder["config.json"]) == CFG.hf_config()
    from safetensors.torch import load

    weights = {}
    for rel in json.loads(folder["model.safetensors.index.json"])["weight_map"].values():
        weights.update(load(folder[rel]))
    assert set(weights) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(weights[name], t), name
    capsys.readouterr()
    with pytest.raises(SystemExit):  # a DCP directory is read locally only: argparse says how to get a copy
        cli(["ckpt", "from-dcp", dcp, str(tmp_path / "x")])
    assert "download it first" in capsys.readouterr().err


def test_a_resumed_local_job_redoes_a_merge_cut_short(local_wsm, tmp_path, monkeypatch):
    """On disk: a job preempted at the milestone 4 (its checkpoint there, then its merge) whose merged folder lost
    its config.json (killed mid-merge) resumes at 4 and merges 4 again before going on: both merged folders end as
    the uninterrupted job's."""
    from wsd_pretrain import train

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    with preempted_at(4):
        assert train.run(["--run-dir", str(run), *WSM])["position"] == 4
    (run / MERGES[0] / "config.json").unlink()
    assert train.run(["--run-dir", str(run), *WSM])["position"] == 8
    for merged in MERGES:
        for f in (local_wsm / merged).iterdir():
            if f.name != "wsd_pretrain_merge.json":
                assert (run / merged / f.name).read_bytes() == f.read_bytes(), (merged, f.name)
