"""dd.hub: the artifact registry, fetch (cache, hand-placed files, verification, errors) and
load_checkpoint (layouts, weights_only). No test touches the network: HF_HUB_OFFLINE=1 or an
endpoint on 127.0.0.1 (a closed port, or a tiny Hub-compatible server run by the test itself)."""
import argparse
import dataclasses
import hashlib
import http.server
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from dd import hub
from dd.hub import ARTIFACTS, Artifact, HubError, fetch, load_checkpoint

MANIFESTS = Path(os.environ.get("DD_MANIFESTS", Path(__file__).resolve().parents[2] / "shared/reference/manifests"))
REV = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub cache layout needs

EXPECTED = {  # name -> (repo_id, filename, kind, load_layout)
    "llamagen-vq-16": ("FoundationVision/LlamaGen", "vq_ds16_c2i.pt", "vq", "model"),
    "llamagen-gpt-b": ("FoundationVision/LlamaGen", "c2i_B_256.pt", "teacher", "model"),
    "llamagen-gpt-l": ("FoundationVision/LlamaGen", "c2i_L_256.pt", "teacher", "model"),
    "llamagen-gpt-xl-t2i": ("peizesun/llamagen_t2i", "t2i_XL_stage1_256.pt", "teacher", "model"),
    "var-vqvae": ("FoundationVision/var", "vae_ch160v4096z32.pth", "vq", "plain"),
    "var-d16": ("FoundationVision/var", "var_d16.pth", "teacher", "plain"),
    "var-d20": ("FoundationVision/var", "var_d20.pth", "teacher", "plain"),
    "var-d24": ("FoundationVision/var", "var_d24.pth", "teacher", "plain"),
    "dd-var-d16": ("microsoft/distilled_decoding", "VAR-DD/var-d16.pth", "dd", "dd_var"),
    "dd-var-d20": ("microsoft/distilled_decoding", "VAR-DD/var-d20.pth", "dd", "dd_var"),
    "dd-var-d24": ("microsoft/distilled_decoding", "VAR-DD/var-d24.pth", "dd", "dd_var"),
    "dd-llamagen-b": ("microsoft/distilled_decoding", "LlamaGen-DD/llamagen-B.pt", "dd", "dd_llamagen"),
    "dd-llamagen-l": ("microsoft/distilled_decoding", "LlamaGen-DD/llamagen-L.pt", "dd", "dd_llamagen"),
    "fid-stat-imagenet256": ("microsoft/distilled_decoding", "ImageNet-256_FID_Statistic/statistic.pth",
                             "fid_stat", "fid_stat"),
}


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # belt and braces: a closed local port


def tiny_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g), "b": torch.zeros(2), "idx": torch.arange(4)}


def fake_hf_cache(cache: Path, art: Artifact, payload: bytes) -> Path:
    """Lay out huggingface_hub's cache: models--org--name/{refs/main, snapshots/<rev>/<file>}."""
    repo = cache / ("models--" + art.repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(REV)
    snap = repo / "snapshots" / REV / art.filename
    snap.parent.mkdir(parents=True)
    snap.write_bytes(payload)
    return snap


def saved_bytes(obj, tmp_path) -> bytes:
    f = tmp_path / "obj.pt"
    torch.save(obj, f)
    return f.read_bytes()


def assert_same_tensors(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------- registry

def test_registry_has_every_paper_artifact():
    for name, (repo_id, filename, kind, layout) in EXPECTED.items():
        art = ARTIFACTS[name]
        assert (art.name, art.repo_id, art.filename, art.kind, art.load_layout) == (name, repo_id, filename, kind,
                                                                                     layout)
        assert art.url == f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
        assert art.description


def test_registry_entries_are_well_formed():
    url = re.compile(r"^https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/[\w./-]+\.(pt|pth)$")
    folder_url = re.compile(r"^https://huggingface\.co/[\w.-]+/[\w.-]+/resolve/main/[\w./-]+$")
    for name, art in ARTIFACTS.items():
        assert art.name == name
        assert (folder_url if art.load_layout == "hf_folder" else url).match(art.url), art.url
        assert art.kind in hub.KINDS and art.load_layout in hub.LAYOUTS
        assert art.size is None or art.size > 0
    # folder members are fetched into dest_dir/<folder>/ (fetch_folder), the rest into dest_dir itself
    basenames = [a.basename for a in ARTIFACTS.values() if a.load_layout != "hf_folder"]
    assert len(basenames) == len(set(basenames)), "two artifacts would collide in one dest_dir"
    members = [m for folder in hub.FOLDERS.values() for m in folder]
    assert sorted(members) == sorted(n for n, a in ARTIFACTS.items() if a.load_layout == "hf_folder")


def test_registry_matches_the_manifest_urls():
    if not MANIFESTS.is_dir():
        pytest.skip(f"manifest folder {MANIFESTS} is absent")
    urls = {a.url for a in ARTIFACTS.values()}
    checked = 0
    for f in sorted(MANIFESTS.glob("*.json")):
        ckpt = json.loads(f.read_text()).get("checkpoint")
        if ckpt and "var-d30" not in f.stem:  # d30 is not a paper row
            assert ckpt["url"] in urls, f"{f.stem}: {ckpt['url']} not in the registry"
            checked += 1
    assert checked >= 7


def test_artifact_rejects_bad_fields():
    with pytest.raises(ValueError, match="kind"):
        Artifact(name="x", repo_id="a/b", filename="f.pt", kind="weights", load_layout="plain", description="")
    with pytest.raises(ValueError, match="load_layout"):
        Artifact(name="x", repo_id="a/b", filename="f.pt", kind="vq", load_layout="flat", description="")
    with pytest.raises(ValueError, match="sha256"):
        Artifact(name="x", repo_id="a/b", filename="f.pt", kind="vq", load_layout="plain", description="",
                 sha256="ABC")
    with pytest.raises(dataclasses.FrozenInstanceError):
        ARTIFACTS["var-d16"].filename = "other.pth"


def test_unknown_artifact_lists_the_known_ones(tmp_path):
    with pytest.raises(HubError, match="unknown artifact 'var-d99'.*var-d16"):
        fetch("var-d99", tmp_path)


# -------------------------------------------------------------------------------------- fetch

def test_offline_error_names_artifact_url_and_manual_path(offline, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(HubError) as info:
        fetch("dd-var-d16", dest, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "'dd-var-d16'" in msg
    assert "https://huggingface.co/microsoft/distilled_decoding/resolve/main/VAR-DD/var-d16.pth" in msg
    assert str(dest.absolute() / "var-d16.pth") in msg
    assert "HF_HUB_OFFLINE" in msg
    assert not (dest / "var-d16.pth").exists()


def test_hand_placed_file_is_accepted_and_recorded(offline, tmp_path):
    dest = tmp_path / "dest"
    with pytest.raises(HubError):
        fetch("var-d16", dest, cache_dir=tmp_path / "cache")
    dest.mkdir()
    state = tiny_state()
    torch.save(state, dest / "var_d16.pth")  # what a user does after reading the error

    path = fetch("var-d16", dest, cache_dir=tmp_path / "cache")
    assert path == dest.absolute() / "var_d16.pth" and not path.is_symlink()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert hub.sidecar_path(path).read_text() == f"{digest}  var_d16.pth\n"
    assert_same_tensors(load_checkpoint(path, "plain"), state)
    assert fetch("var-d16", dest) == path  # verifies again, still no network

    with open(path, "ab") as f:  # corrupted after it was recorded
        f.write(b"\0")
    with pytest.raises(HubError, match=r"sha256 mismatch: expected [0-9a-f]{64}.*got [0-9a-f]{64}.*delete"):
        fetch("var-d16", dest)
    with pytest.raises(HubError, match="sha256 mismatch"):
        load_checkpoint(path, "plain")


def test_hand_placed_file_checked_against_known_size_and_sha(offline, tmp_path):
    payload = saved_bytes(tiny_state(), tmp_path)
    good = Artifact(name="t", repo_id="org/repo", filename="sub/t.pt", kind="teacher", load_layout="plain",
                    description="", size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "t.pt").write_bytes(payload)
    assert fetch(good, tmp_path / "dest").read_bytes() == payload

    (tmp_path / "dest" / "t.pt").write_bytes(payload[:-10])
    with pytest.raises(HubError, match=rf"size mismatch: expected {len(payload)} bytes .* got {len(payload) - 10}"):
        fetch(good, tmp_path / "dest")


def test_fake_hf_cache_is_used_offline_and_linked(offline, tmp_path):
    art = ARTIFACTS["var-vqvae"]
    payload = saved_bytes(tiny_state(1), tmp_path)
    snap = fake_hf_cache(tmp_path / "cache", art, payload)

    path = fetch("var-vqvae", tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert path == (tmp_path / "dest" / "vae_ch160v4096z32.pth").absolute()
    assert path.is_symlink() and Path(os.readlink(path)) == snap.absolute()
    assert hub.sidecar_path(path).read_text().split()[0] == hashlib.sha256(payload).hexdigest()
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["vae_ch160v4096z32.pth",
                                                                     "vae_ch160v4096z32.pth.sha256"]
    assert_same_tensors(hub.load_artifact("var-vqvae", tmp_path / "dest"), tiny_state(1))

    snap.write_bytes(payload[:-1] + b"!")  # the cached bytes change behind the link
    with pytest.raises(HubError, match=rf"a link to {re.escape(str(snap.resolve()))}.*sha256 mismatch"):
        fetch("var-vqvae", tmp_path / "dest", cache_dir=tmp_path / "cache")


def test_fake_hf_cache_is_used_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # connection refused at once
    art = ARTIFACTS["dd-llamagen-b"]
    fake_hf_cache(tmp_path / "cache", art, saved_bytes({"ema": tiny_state()}, tmp_path))
    path = fetch(art.name, tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert path.name == "llamagen-B.pt"
    assert_same_tensors(load_checkpoint(path, "dd_llamagen"), tiny_state())


def test_checksum_mismatch_leaves_no_link(offline, tmp_path):
    payload = saved_bytes(tiny_state(), tmp_path)
    art = Artifact(name="t", repo_id="org/repo", filename="t.pt", kind="teacher", load_layout="plain",
                   description="", sha256="0" * 64)
    snap = fake_hf_cache(tmp_path / "cache", art, payload)
    dest = tmp_path / "dest"
    with pytest.raises(HubError) as info:
        fetch(art, dest, cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert str(snap) in msg and "0" * 64 in msg and hashlib.sha256(payload).hexdigest() in msg
    assert "delete" in msg
    assert not dest.exists() or list(dest.iterdir()) == []


def test_copy_when_symlinks_are_not_supported(offline, monkeypatch, tmp_path):
    art = ARTIFACTS["var-d20"]
    payload = saved_bytes(tiny_state(2), tmp_path)
    fake_hf_cache(tmp_path / "cache", art, payload)

    def no_symlinks(*args, **kwargs):
        raise OSError(95, "Operation not supported")  # what e.g. some network filesystems answer

    monkeypatch.setattr(os, "symlink", no_symlinks)
    path = fetch("var-d20", tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert not path.is_symlink() and path.read_bytes() == payload
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["var_d20.pth", "var_d20.pth.sha256"]


class _Hub(http.server.BaseHTTPRequestHandler):
    """The two calls hf_hub_download makes: HEAD (commit, etag, size) and GET (the bytes)."""
    files: dict[str, bytes] = {}
    error_code: str | None = None  # answer every request with this Hub error
    requests: list[str] = []

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        self.requests.append(f"{self.command} {self.path}")
        data = self.files.get(self.path)
        if self.error_code or data is None:
            status = 403 if self.error_code == "GatedRepo" else 404
            self.send_response(status)
            self.send_header("X-Error-Code", self.error_code or "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("X-Repo-Commit", REV)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_hub(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(_Hub, "files", {})
    monkeypatch.setattr(_Hub, "requests", [])
    monkeypatch.setattr(_Hub, "error_code", None)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield _Hub
    server.shutdown()
    server.server_close()


def test_download_through_huggingface_hub_verifies_and_links(local_hub, tmp_path):
    ckpt = {"trainer": {"ema_parameters": tiny_state(3), "var_wo_ddp": tiny_state(4)}, "epoch": 7}
    payload = saved_bytes(ckpt, tmp_path)
    art = Artifact(name="t", repo_id="org/repo", filename="VAR-DD/t.pth", kind="dd", load_layout="dd_var",
                   description="", size=len(payload), sha256=hashlib.sha256(payload).hexdigest())
    local_hub.files["/org/repo/resolve/main/VAR-DD/t.pth"] = payload

    path = fetch(art, tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert path.is_symlink() and path.read_bytes() == payload
    assert Path(os.path.realpath(path)).is_relative_to(tmp_path / "cache")
    assert any(r.startswith("GET") for r in local_hub.requests)
    assert_same_tensors(load_checkpoint(path, "dd_var"), tiny_state(3))
    assert_same_tensors(load_checkpoint(path, "dd_var", ema=False), tiny_state(4))

    seen = len(local_hub.requests)
    assert fetch(art, tmp_path / "dest", cache_dir=tmp_path / "cache") == path
    assert len(local_hub.requests) == seen, "an artifact already in dest_dir must not touch the network"


def test_download_with_wrong_checksum_is_refused(local_hub, tmp_path):
    payload = saved_bytes(tiny_state(), tmp_path)
    art = Artifact(name="t", repo_id="org/repo", filename="t.pt", kind="teacher", load_layout="plain",
                   description="", sha256=hashlib.sha256(b"something else").hexdigest())
    local_hub.files["/org/repo/resolve/main/t.pt"] = payload
    with pytest.raises(HubError, match="sha256 mismatch"):
        fetch(art, tmp_path / "dest", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "dest" / "t.pt").exists() and not (tmp_path / "dest" / "t.pt").is_symlink()


@pytest.mark.parametrize("error_code, reason", [("EntryNotFound", "was not found in .* 404"),
                                                ("GatedRepo", "gated.*token")])
def test_hub_refusals_give_one_clear_error(local_hub, tmp_path, error_code, reason):
    local_hub.error_code = error_code
    with pytest.raises(HubError) as info:
        fetch("llamagen-gpt-b", tmp_path / "dest", cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert re.search(reason, msg), msg
    assert ARTIFACTS["llamagen-gpt-b"].url in msg and str((tmp_path / "dest" / "c2i_B_256.pt").absolute()) in msg


# ---------------------------------------------------------------------------- load_checkpoint

@pytest.mark.parametrize("layout, wrap", [
    ("plain", lambda sd: sd),                                             # VAR teacher / VQVAE
    ("plain", lambda sd: {"model": sd}),                                  # tolerated like LlamaGen's loader
    ("model", lambda sd: {"model": sd, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-B")}),
    ("model", lambda sd: {"module": sd}),                                 # deepspeed
    ("model", lambda sd: {"state_dict": sd}),
    ("model", lambda sd: sd),                                             # FSDP: the file is the state dict
    ("dd_var", lambda sd: {"trainer": {"ema_parameters": sd, "var_wo_ddp": {"w": torch.ones(1)}}}),
    ("dd_llamagen", lambda sd: {"ema": sd, "model": {"w": torch.ones(1)}, "steps": 3}),
])
def test_load_checkpoint_unwraps_each_layout(tmp_path, layout, wrap):
    state = tiny_state(5)
    torch.save(wrap(state), tmp_path / "c.pt")
    assert_same_tensors(load_checkpoint(tmp_path / "c.pt", layout), state)


def test_load_checkpoint_raw_dd_weights(tmp_path):
    torch.save({"ema": tiny_state(1), "model": tiny_state(2)}, tmp_path / "l.pt")
    assert_same_tensors(load_checkpoint(tmp_path / "l.pt", "dd_llamagen", ema=False), tiny_state(2))
    torch.save({"trainer": {"ema_parameters": tiny_state(1), "var_wo_ddp": tiny_state(2)}}, tmp_path / "v.pt")
    assert_same_tensors(load_checkpoint(tmp_path / "v.pt", "dd_var", ema=True), tiny_state(1))
    assert_same_tensors(load_checkpoint(tmp_path / "v.pt", "dd_var", ema=False), tiny_state(2))
    with pytest.raises(ValueError, match="ema="):
        load_checkpoint(tmp_path / "v.pt", "plain", ema=True)


@pytest.mark.parametrize("as_numpy", [False, True])
def test_load_fid_statistic(tmp_path, as_numpy):
    m, s = np.arange(4, dtype=np.float64), np.eye(4)
    torch.save({"m": m, "s": s} if as_numpy else {"m": torch.from_numpy(m), "s": torch.from_numpy(s)},
               tmp_path / "statistic.pth")
    stat = load_checkpoint(tmp_path / "statistic.pth", "fid_stat")
    assert stat["m"].dtype == torch.float64 and torch.equal(stat["m"], torch.from_numpy(m))
    assert torch.equal(stat["s"], torch.from_numpy(s))


def test_load_fid_statistic_with_bad_shape(tmp_path):
    torch.save({"m": torch.zeros(4), "s": torch.zeros(3, 3)}, tmp_path / "statistic.pth")
    with pytest.raises(HubError, match="shapes"):
        load_checkpoint(tmp_path / "statistic.pth", "fid_stat")


def test_missing_key_lists_what_is_there(tmp_path):
    torch.save({"trainer": {"optimizer": {}, "step": 1}, "epoch": 2}, tmp_path / "v.pt")
    with pytest.raises(HubError, match=r"ckpt\['trainer'\] has no key 'ema_parameters'.*optimizer, step"):
        load_checkpoint(tmp_path / "v.pt", "dd_var")
    torch.save({"optimizer": {}, "steps": 4}, tmp_path / "g.pt")
    with pytest.raises(HubError, match="found no weights.*optimizer, steps"):
        load_checkpoint(tmp_path / "g.pt", "model")
    torch.save({"model": tiny_state()}, tmp_path / "l.pt")
    with pytest.raises(HubError, match="has no key 'ema'.*model"):
        load_checkpoint(tmp_path / "l.pt", "dd_llamagen")
    torch.save({"ema": {"w": torch.ones(1), "n": 3}}, tmp_path / "n.pt")
    with pytest.raises(HubError, match="not tensors: n"):
        load_checkpoint(tmp_path / "n.pt", "dd_llamagen")


def test_truncated_and_foreign_files_are_refused(tmp_path):
    torch.save(tiny_state(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("<html>404 Not Found</html>")
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("cut.pt", "text.pt", "empty.pt"):
        with pytest.raises(HubError, match="not a readable torch checkpoint.*delete it"):
            load_checkpoint(tmp_path / name, "plain")
    with pytest.raises(HubError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "absent.pt", "plain")


class _RunsCode:
    """A pickle that would create a file when unpickled: weights_only must refuse it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_weights_only_refuses_arbitrary_objects(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    torch.save({"model": tiny_state(), "payload": _RunsCode(marker)}, tmp_path / "evil.pt",
               _use_new_zipfile_serialization=zip_format)
    with pytest.raises(HubError, match=r"refused to load.*open.*weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt", "model")
    assert not marker.exists(), "the pickled call ran"


# ---------------------------------------------------------------------------- a hash pinned in params.yaml
def test_params_pin_is_checked_by_dd_fetch_offline(offline, tmp_path, monkeypatch):
    """teacher.sha256 in params.yaml pins a file: the right one is used, another is one error naming the file
    and the params key (no pin: trust on first use, covered above)."""
    import yaml

    from dd.config import load_params
    from dd.teacher_stage import fetch_teacher

    repo_params = Path(__file__).resolve().parents[1] / "params.yaml"
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    monkeypatch.setenv("DD_CHECKPOINTS", str(checkpoints))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    setting = load_params(repo_params).setting("var-d16")
    payloads = {}
    for role, name in (("tokenizer", setting.teacher.tokenizer_artifact), ("model", setting.teacher.model_artifact)):
        payloads[role] = f"hand-placed {name}".encode()
        (checkpoints / ARTIFACTS[name].basename).write_bytes(payloads[role])

    def params_with_pin(digest: str):
        raw = yaml.safe_load(repo_params.read_text())
        raw["tracking"] = {"mlflow_uri": "sqlite:///mlflow.db", "experiment": "tests"}
        raw["settings"]["var-d16"]["teacher"] = dict(raw["settings"]["var-d16"]["teacher"], sha256={"model": digest})
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return load_params(path)

    wrong = params_with_pin(hashlib.sha256(b"another file").hexdigest())
    model_file = checkpoints / ARTIFACTS[setting.teacher.model_artifact].basename
    with pytest.raises(HubError) as err:
        fetch_teacher(wrong, wrong.setting("var-d16"), include_dd=False)
    message = str(err.value)
    assert "\n" not in message and str(model_file) in message and "sha256 mismatch" in message
    assert "settings.var-d16.teacher.sha256.model" in message
    assert not (tmp_path / "results" / "var-d16" / "teacher").exists()

    right = params_with_pin(hashlib.sha256(payloads["model"]).hexdigest())
    folder = fetch_teacher(right, right.setting("var-d16"), include_dd=False)
    assert json.loads((folder / "teacher.json").read_text())["files"]["model"]["file"] == model_file.name
