"""MLflow review in a real browser: a stage run logged through dd.tracking (an `fid` metric and a PNG picture) is
visible through the MLflow server's REST API and on the run page rendered by headless Chromium.

Chromium comes from Debian (`apt-get install -y chromium`; .ci/run installs it). Outside CI the test is skipped when
chromium is absent; under CI (CI=true) a missing chromium fails the test."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from dd.config import load_params
from dd.tracking import experiment_name, stage_run

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed under CI: .ci/run installs it (apt-get install -y chromium)")
        pytest.skip("chromium not installed (apt-get install -y chromium)")
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None, timeout: float = 10):
    body = None if data is None else json.dumps(data).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


@pytest.fixture
def logged_run(tmp_path, monkeypatch):
    """A tmp project whose MLflow store holds one `toy-var/evaluate` run with fid and a sample-grid PNG."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root (./mlruns) lands in the tmp project
    params = load_params(tmp_path / "params.yaml")
    setting = params.setting("toy-var")
    grid = Image.new("RGB", (64, 16), (200, 30, 30))
    with stage_run(params, setting, "evaluate") as mlflow:
        mlflow.log_metric("fid", 12.5)
        mlflow.log_image(grid, "samples/grid.png")
        run_id = mlflow.active_run().info.run_id
    return tmp_path, params, setting, run_id


def test_run_metric_and_picture_visible_in_mlflow_ui(logged_run):
    chromium = _chromium()
    project, params, setting, run_id = logged_run
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false", MLFLOW_DISABLE_TELEMETRY="true")
    log = open(project / "server.log", "w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{project / 'mlflow.db'}",
         "--artifacts-destination", str(project / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if _get(f"{base}/health", timeout=2)[2].strip() == b"OK":
                    break
            except OSError:
                pass
            assert server.poll() is None, (project / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 120 s"
            time.sleep(0.5)

        # REST: the setting's experiment, the run, its fid, its picture (byte-identical to the logged file)
        name = experiment_name(params, setting)
        _, _, body = _get(f"{base}/api/2.0/mlflow/experiments/get-by-name?experiment_name={urllib.request.quote(name)}")
        experiment_id = json.loads(body)["experiment"]["experiment_id"]
        _, _, body = _get(f"{base}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        runs = json.loads(body)["runs"]
        assert [r["info"]["run_id"] for r in runs] == [run_id]
        run = runs[0]
        assert run["info"]["run_name"] == "toy-var/evaluate" and run["info"]["status"] == "FINISHED"
        assert {m["key"]: m["value"] for m in run["data"]["metrics"]}["fid"] == 12.5
        _, _, body = _get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={run_id}&path=samples")
        assert [f["path"] for f in json.loads(body)["files"]] == ["samples/grid.png"]
        status, kind, png = _get(f"{base}/get-artifact?path=samples/grid.png&run_uuid={run_id}")
        assert status == 200 and kind.startswith("image/png")
        local = Path(run["info"]["artifact_uri"].removeprefix("file://")) / "samples" / "grid.png"
        assert png == local.read_bytes()

        # the run page in a real browser: the React app renders the run's name and its fid metric
        with tempfile.TemporaryDirectory() as profile:
            flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     f"--user-data-dir={profile}", "--window-size=1400,900", "--virtual-time-budget=20000"]
            url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
            dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                                 timeout=180).stdout
            artifact_url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/samples/grid.png"
            artifact_dom = subprocess.run([chromium, *flags, "--dump-dom", artifact_url], capture_output=True,
                                          text=True, timeout=180).stdout
            shot = project / "run_page.png"
            subprocess.run([chromium, *flags, f"--screenshot={shot}", url], capture_output=True, timeout=180)
        assert "toy-var/evaluate" in dom, dom[-2000:]
        assert "fid" in dom
        # the artifact view of the run lists the sample grid and shows it as an image fetched from the server
        assert "grid.png" in artifact_dom, artifact_dom[-2000:]
        assert re.search(r"<img[^>]+grid\.png", artifact_dom), artifact_dom[-3000:]
        with Image.open(shot) as image:
            assert image.size == (1400, 900)
            # a rendered page, not a blank one: many distinct colours
            assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()
