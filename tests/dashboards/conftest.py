"""One instrumented training against the suite's real InfluxDB and PostgreSQL, shared by
the dashboard tests of a module: a node agent (every collector; NVML through the scripted
library of tests/agent, as on a node with two GPUs, one in MIG mode) and a job
(``provscope.workflow`` + ``provscope.watch`` on a tiny torch model) that talks to it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROVISIONING = REPO / "provisioning"


def load_dashboards() -> dict[str, dict]:
    """The committed dashboards, by uid."""
    out = {}
    for path in sorted((PROVISIONING / "dashboards" / "json").glob("*.json")):
        data = json.loads(path.read_text())
        out[data["uid"]] = data
    return out


def _fake_nvml_class():
    """The scripted pynvml of the agent tests (a system library, never a database)."""
    spec = importlib.util.spec_from_file_location(
        "_provscope_agent_fakes", REPO / "tests" / "agent" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.FakeNvml


@dataclass(frozen=True)
class Instrumented:
    """Where the run went and when: the stores, the run id and its time window."""

    influx_url: str
    influx_db: str
    postgres_url: str
    run_id: str
    host: str
    start_ms: int
    end_ms: int


def _train(settings: dict, data: Path, ckpt: Path) -> str:
    import torch
    from torch import nn

    import provscope

    class TinyLM(nn.Module):
        """Token ids in, one score out: an embedding and a small MLP."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.hidden = nn.Linear(8, 16)
            self.act = nn.ReLU()
            self.out = nn.Linear(16, 1)

        def forward(self, ids):
            return self.out(self.act(self.hidden(self.embed(ids).mean(dim=1))))

    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ids = torch.randint(0, 50, (8, 12))
    target = torch.randn(8, 1)
    with provscope.workflow("dashboards-fixture", config={"lr": 0.05}, campaign="dash",
                            settings=settings) as run:
        run.use(data, kind="dataset")
        with run.task("train", kind="task") as task:
            watcher = provscope.watch(model, every=2, optimizer=opt)
            for _epoch in run.epochs(2):
                for _step, _ in run.steps(range(12), task_every=4):
                    opt.zero_grad()
                    loss = (model(ids) - target).pow(2).mean()
                    loss.backward()
                    opt.step()
                    run.log(loss=loss.item())
                    time.sleep(0.06)
                with run.task("eval", kind="eval"):
                    run.log(eval_loss=loss.item() * 1.1)
            torch.save(model.state_dict(), ckpt)
            task.produce(ckpt, kind="checkpoint")
            watcher.unwatch()
        assert run.flush(30), "the job's records were not all handed over"
    return run.run_id


@pytest.fixture(scope="package")
def instrumented(influx_server, postgres_server) -> Instrumented:
    """Run the agent and the instrumented job once; the stores then hold every
    measurement and table the dashboards read."""
    pytest.importorskip("torch")
    from provscope.agent.daemon import Agent

    from provscope.config import load_config
    from provscope.job.identity import LAUNCHER_VARS

    root = Path(tempfile.mkdtemp(prefix="ps-dash-", dir="/tmp"))
    db = "dash_" + uuid.uuid4().hex[:10]
    influx_server.create_database(db)
    pg_url = postgres_server.create_database("dash_" + uuid.uuid4().hex[:10])
    host = "dash-node"
    settings = {
        "host": host,
        "agent.socket_path": str(root / "agent.sock"),
        "agent.interval_s": 0.25,
        "agent.collectors.filesystem.interval_s": 0.5,
        "agent.collectors.amdsmi.enabled": False,
        "prometheus.enabled": False,
        "influxdb.url": influx_server.url,
        "influxdb.database": db,
        "influxdb.flush_interval_s": 0.2,
        "influxdb.spool_dir": str(root / "spool"),
        "lineage.url": pg_url,
        "lineage.flush_interval_s": 0.2,
    }
    fake = _fake_nvml_class()(processes={0: [(os.getpid(), 1 << 30)]})
    mp = pytest.MonkeyPatch()
    try:
        for name in list(os.environ):
            if name.startswith("PROVSCOPE_") or name in LAUNCHER_VARS:
                mp.delenv(name)
        mp.setenv("HOME", str(root / "home"))
        mp.setenv("XDG_RUNTIME_DIR", str(root))
        mp.setenv("XDG_STATE_HOME", str(root / "state"))
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        mp.chdir(root)
        mp.setitem(sys.modules, "pynvml", fake)
        data = root / "corpus.txt"
        data.write_text("tokens " * 100)
        config = load_config(environ={}, overrides=settings)
        start_ms = int(time.time() * 1000)
        with Agent(config) as agent:
            assert agent.scheduler is not None
            time.sleep(1.0)  # a few samples before the job starts
            run_id = _train(settings, data, root / "model.pt")
            time.sleep(1.5)  # and after it ends: counters need two samples for a rate
        end_ms = int(time.time() * 1000)
        yield Instrumented(influx_server.url, db, pg_url, run_id, host, start_ms, end_ms)
    finally:
        mp.undo()
        shutil.rmtree(root, ignore_errors=True)
