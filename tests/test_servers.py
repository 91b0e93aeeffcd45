"""The UIs for real: `dagster dev` driven through its GraphQL API, `mlflow server` through its REST API."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_sigint() -> None:
    # a server started with SIGINT ignored (inherited from a background shell) ignores SIGTERM too
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def _server(command: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """Start a server in its own process group; on exit SIGINT the group, then SIGKILL what is left."""
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
        try:
            yield process
        finally:
            for sig, wait in ((signal.SIGINT, 15), (signal.SIGKILL, 5)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    process.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # children (code servers) that outlived the parent


def _wait_for(check, process: subprocess.Popen, log: Path, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
        try:
            result = check()
            if result:
                return result
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout}s: {log.read_text()[-3000:]}")


def _post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status } }
    ... on PythonError { message }
    ... on RunConfigValidationInvalid { errors { message } }
    ... on InvalidSubsetError { message }
  }
}"""
RUN = "query Run($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"
GRAPH = "{ assetNodes { assetKey { path } dependencyKeys { path } groupName } }"
LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"
REPOS = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
MATERIALIZATION = """
query Asset($key: AssetKeyInput!) { assetOrError(assetKey: $key) { ... on Asset {
  assetMaterializations(limit: 1) { runId metadataEntries { label
    ... on IntMetadataEntry { intValue } ... on TextMetadataEntry { text } } } } } }"""


def test_dagster_dev_lists_the_graph_and_materialises_through_graphql(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    port = _free_port()
    env = {**os.environ, "DAGSTER_HOME": str(home), "DATA_DIR": str(tmp_path / "data")}
    env.pop("MARKET_DATA_PATH", None)
    env.pop("BASE_MODEL", None)
    url = f"http://127.0.0.1:{port}/graphql"

    def gql(query: str, variables: dict | None = None) -> dict:
        out = _post_json(url, {"query": query, "variables": variables or {}})
        assert not out.get("errors"), out["errors"]
        return out["data"]

    command = [
        str(BIN / "dagster"),
        "dev",
        "-w",
        "workspace.yaml",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log = tmp_path / "dagster_dev.log"
    with _server(command, env, log) as process:
        _wait_for(
            lambda: (
                all(
                    e["loadStatus"] == "LOADED" for e in gql(LOCATIONS)["workspaceOrError"]["locationEntries"]
                )
                or None
            ),
            process,
            log,
            timeout=180,
        )
        nodes = gql(GRAPH)["assetNodes"]
        graph = {
            "/".join(n["assetKey"]["path"]): {"/".join(d["path"]) for d in n["dependencyKeys"]} for n in nodes
        }
        assert graph["universe"] == {"raw_market_data"}
        assert graph["features"] == {"raw_market_data", "universe"}
        assert graph["predictions"] == {"regressor", "training_set"}
        assert {"prompt_corpus", "base_model", "hyperparameters"} <= graph["regressor"]
        repo = gql(REPOS)["repositoriesOrError"]["nodes"][0]
        params = {
            "selector": {
                "repositoryLocationName": repo["location"]["name"],
                "repositoryName": repo["name"],
                "jobName": "__ASSET_JOB",
                "assetSelection": [{"path": [k]} for k in ("raw_market_data", "universe", "features")],
            },
            "runConfigData": {
                "ops": {
                    "raw_market_data": {"config": {"synthetic_n_symbols": 40, "synthetic_years": 0.5}},
                    "universe": {"config": {"top_n": 20}},
                }
            },
        }
        launched = gql(LAUNCH, {"params": params})["launchRun"]
        assert launched["__typename"] == "LaunchRunSuccess", launched
        run_id = launched["run"]["runId"]
        status = _wait_for(
            lambda: (
                (s := gql(RUN, {"id": run_id})["runOrError"]["status"]) in ("SUCCESS", "FAILURE", "CANCELED")
                and s
            ),
            process,
            log,
            timeout=300,
        )
        assert status == "SUCCESS", log.read_text()[-3000:]
        materialization = gql(MATERIALIZATION, {"key": {"path": ["features"]}})["assetOrError"]
        latest = materialization["assetMaterializations"][0]
        assert latest["runId"] == run_id
        entries = {e["label"]: e for e in latest["metadataEntries"]}
        assert entries["dagster/row_count"]["intValue"] > 0
        assert entries["horizon"]["intValue"] == 1


def test_mlflow_server_serves_the_champion_and_its_metrics(registered_store, tmp_path: Path) -> None:
    store, first, _, _ = registered_store
    port = _free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{store / 'mlflow.db'}",
        "--default-artifact-root",
        (store / "mlartifacts").resolve().as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow_server.log"
    with _server(command, {**os.environ}, log) as process:
        _wait_for(lambda: urllib.request.urlopen(f"{base}/health", timeout=2).status == 200, process, log)
        query = urllib.parse.urlencode({"name": "return-regressor", "alias": "champion"})
        version = _get_json(f"{base}/api/2.0/mlflow/registered-models/alias?{query}")["model_version"]
        assert version["version"] == first["model_version"] and "champion" in version["aliases"]
        run = _get_json(f"{base}/api/2.0/mlflow/runs/get?run_id={version['run_id']}")["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert abs(metrics["validation_rank_ic"] - first["val_rank_ic"]) < 1e-9
        assert "ridge/validation_rank_ic" in metrics and "test_rank_icir" in metrics
