"""Shared fixtures: an isolated Prefect API (test harness), the demo dataset, a moto S3 server on loopback."""

from __future__ import annotations

import os
import socket

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

TEST_KEY = "7d1f0c9a4b2e8f63a5c0d94e1b7f2a6c83e5d0b19f4a7c2e6d8b3f0a5c1e9d47"  # a strong test key (64 hex)


def pytest_collection_modifyitems(config, items):
    import torch

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One Prefect test server for the whole session (temporary database under a temporary PREFECT_HOME)."""
    home = tmp_path_factory.mktemp("prefect-home")
    os.environ["PREFECT_HOME"] = str(home)
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def deid_key_module():
    """The test key in $MEDPIPE_DEID_KEY for a whole module (module-scoped stores need it), restored after."""
    old = os.environ.get("MEDPIPE_DEID_KEY")
    os.environ["MEDPIPE_DEID_KEY"] = TEST_KEY
    yield TEST_KEY
    if old is None:
        os.environ.pop("MEDPIPE_DEID_KEY", None)
    else:
        os.environ["MEDPIPE_DEID_KEY"] = old


@pytest.fixture()
def deid_key(monkeypatch):
    monkeypatch.setenv("MEDPIPE_DEID_KEY", TEST_KEY)
    return TEST_KEY


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory):
    """A small demo dataset plus one file of every defective kind (under defective/)."""
    from medpipe.demo import DemoSpec, generate_demo_dataset, write_defective_files

    root = tmp_path_factory.mktemp("demo") / "data"
    summary = generate_demo_dataset(root, DemoSpec(patients=6, xray_per_study=4, png_per_study=4, seed=7))
    expected = write_defective_files(root / "defective")
    return root, summary, expected


@pytest.fixture(scope="session")
def moto_s3():
    """A real S3 endpoint on 127.0.0.1 (moto server mode); stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


VOLUME_PLAN = {"base_features": 8, "n_stages": 3}  # a small network: the volume-store tests train on 2 CPU cores


@pytest.fixture(scope="session")
def volume_store(prefect_api, demo_source, tmp_path_factory):
    """The demo source ingested as 3D volumes (layout "volumes", a small plan), once per session; read-only."""
    from flows.ingest import run_ingest
    from medpipe.config import IngestConfig, PreprocessConfig

    old = os.environ.get("MEDPIPE_DEID_KEY")
    os.environ["MEDPIPE_DEID_KEY"] = TEST_KEY
    try:
        store = tmp_path_factory.mktemp("volumes") / "store-3d.zarr"
        config = IngestConfig(preprocess=PreprocessConfig(kind="3d", shape=(32, 64, 64), plan=VOLUME_PLAN),
                              classes=["none", "lesion"])
        summary = run_ingest(str(demo_source[0]), str(store), config)
    finally:
        if old is None:
            os.environ.pop("MEDPIPE_DEID_KEY", None)
        else:
            os.environ["MEDPIPE_DEID_KEY"] = old
    return store, summary
