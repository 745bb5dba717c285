"""Experiment trackers for real: wandb in offline mode (its own run files, read back), and
TensorBoard event files (read with TensorBoard's own reader). Runs in .venv-interop, which
has the extras `wandb` and `tensorboard`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from jaxsae.train import train
from tests.conftest import small_config, train_until_crash

wandb = pytest.importorskip("wandb")
pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _wandb_records(path: Path) -> list:
    """The records of a wandb transaction log (`run-<id>.wandb`): a 7-byte header (`:W&B`,
    magic, version), then LevelDB log blocks of 32 KiB whose chunks (checksum, length, type:
    full / first / middle / last) carry protobuf `Record`s. The wandb package (0.31) reads
    these in its Go core only, so the test splits the chunks itself."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length = int.from_bytes(data[pos + 4:pos + 6], "little")
        kind, chunk = data[pos + 6], data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


def _wandb_run(directory: Path) -> dict:
    """Run id, name, group, config, history rows and summary of the offline runs under
    `directory` (a resumed run has one offline directory per attempt, all with one id)."""
    files = sorted(directory.glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline wandb run under {directory}"
    out = {"ids": set(), "history": [], "summary": {}, "config": {}, "attempts": len(files)}
    for file in files:
        # wandb's core process writes the log: finish() may return before the last records
        # (the run's exit among them) are on disk on a busy machine.
        deadline = time.monotonic() + 60
        records = _wandb_records(file)
        while (not any(r.WhichOneof("record_type") == "exit" for r in records)
               and time.monotonic() < deadline):
            time.sleep(0.5)
            records = _wandb_records(file)
        kinds = sorted({r.WhichOneof("record_type") for r in records})
        assert "exit" in kinds and "run" in kinds, (file, kinds)
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(record.run.run_id)
                out["name"], out["group"] = record.run.display_name, record.run.run_group
                out["config"].update({i.key: json.loads(i.value_json)
                                      for i in record.run.config.update})
            elif kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "exit":
                out.setdefault("exit_codes", []).append(record.exit.exit_code)
            elif kind == "summary":
                out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
    return out


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_wandb_offline_gets_config_metrics_and_evaluation(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run",
                       log={"every_steps": 4, "wandb": {"project": "p", "mode": "offline"}})
    result = train(cfg, progress=False)
    run = _wandb_run(tmp_path / "run")
    assert len(run["ids"]) == 1 and run["name"] == "test"
    assert run["config"]["sae"]["d_sae"] == 64 and run["config"]["optim"]["lr"] == 3e-3
    logged = [row for row in run["history"] if "loss" in row]
    written = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [row["tokens"] for row in logged] == [line["tokens"] for line in written]
    for row, line in zip(logged, written, strict=True):
        assert row["loss"] == pytest.approx(line["loss"]) and row["l0"] == pytest.approx(
            line["l0"])
    assert run["summary"]["eval/explained_variance"] == pytest.approx(
        result.eval["explained_variance"])


def test_wandb_resume_continues_the_same_run(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run",
                       log={"every_steps": 4, "wandb": {"mode": "offline"}})
    train_until_crash(cfg, at_batch=12)  # checkpoint 8, then a crash
    first_id = (tmp_path / "run" / "wandb-run-id").read_text().strip()
    train(cfg, progress=False)
    run = _wandb_run(tmp_path / "run")
    assert run["ids"] == {first_id} and run["attempts"] == 2
    assert run["exit_codes"] == [1, 0]  # the crash, then the finished attempt
    tokens = [row["tokens"] for row in run["history"] if "loss" in row]
    assert tokens[-1] == 24 * 256 and set(tokens) == {256 * s for s in (4, 8, 12, 16, 20, 24)}


def test_wandb_sweep_saes_are_runs_of_one_group(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run", sweep={"loss.1.coefficient": [0.01, 0.3]},
                       log={"every_steps": 4, "wandb": {"mode": "offline", "tags": ["t"]}})
    result = train(cfg, progress=False)
    runs = [_wandb_run(member.run_dir) for member in result.sweep]
    assert runs[0]["ids"] != runs[1]["ids"]
    assert {r["group"] for r in runs} == {"test"}
    assert [r["name"] for r in runs] == ["test (loss.1.coefficient=0.01)",
                                        "test (loss.1.coefficient=0.3)"]
    assert [r["config"]["loss"][1]["coefficient"] for r in runs] == [0.01, 0.3]


def test_a_failing_tracker_warns_once_and_the_run_goes_on(small_data, tmp_path, monkeypatch):
    calls = []

    def no_network(*args, **kwargs):
        calls.append(1)
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "init", no_network)
    messages = []
    cfg = small_config(small_data, tmp_path / "run",
                       log={"every_steps": 4, "wandb": {"mode": "online"}, "tensorboard": True})
    result = train(cfg, progress=False, log=messages.append)
    assert result.step == 24 and len(calls) == 1
    warnings = [m for m in messages if "log.wandb" in m]
    assert len(warnings) == 1 and "unreachable" in warnings[0], messages
    assert len(_metrics(tmp_path / "run" / "metrics.jsonl")) == 6  # the record is whole
    assert list((tmp_path / "run" / "tensorboard").iterdir())  # the other tracker went on


def test_tensorboard_event_files(small_data, tmp_path):
    cfg = small_config(small_data, tmp_path / "run", sweep={"loss.1.coefficient": [0.01, 0.3]},
                       log={"every_steps": 4, "tensorboard": True})
    result = train(cfg, progress=False)
    for member in result.sweep:
        events = event_accumulator.EventAccumulator(str(member.run_dir / "tensorboard"))
        events.Reload()
        written = _metrics(member.run_dir / "metrics.jsonl")
        loss = events.Scalars("loss")
        assert [e.step for e in loss] == [line["tokens"] for line in written]
        assert [e.value for e in loss] == pytest.approx([line["loss"] for line in written],
                                                        rel=1e-6)
        assert "loss.l1" in events.Tags()["scalars"]
        (ev,) = events.Scalars("eval/explained_variance")
        assert ev.step == 24 * 256 and ev.value == pytest.approx(
            member.eval["explained_variance"], rel=1e-6)


def test_tensorboard_after_a_resume_shows_each_point_once(small_data, tmp_path):
    """An attempt that crashed after its checkpoint at step 8 had logged steps 10 and 12 too;
    the resumed run logs them again, and TensorBoard shows them once (the purge step), as
    metrics.jsonl does. (Both attempts run within a second or two: event files are named by
    the second, and a second file of the same name used to replace the first.)"""
    cfg = small_config(small_data, tmp_path / "run",
                       log={"every_steps": 2, "tensorboard": True})
    train_until_crash(cfg, at_batch=14)
    before = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    before.Reload()
    assert max(e.step for e in before.Scalars("loss")) > 8 * 256  # logged past the checkpoint
    train(cfg, progress=False)
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    written = _metrics(tmp_path / "run" / "metrics.jsonl")
    assert [e.step for e in events.Scalars("loss")] == [line["tokens"] for line in written]
    assert [line["step"] for line in written] == list(range(2, 25, 2))
