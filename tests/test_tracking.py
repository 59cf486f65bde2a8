"""toygpt/tracking.py (`train.py --report-to`): the trackers get exactly metrics.jsonl's records, read back with each
tracker's own reader, offline."""


import pytest

from conftest import REPO, run_python
from toygpt import tracking

RECORDS = [
    {"step": 1, "train_loss": 10.5, "lr": 0.001, "tokens_per_s": 900.0},
    {"step": 2, "train_loss": 9.25, "lr": 0.002, "tokens_per_s": 950.0},
    {"step": 2, "val_loss": 9.5, "val_perplexity": 13359.7, "val_bits_per_char": 4.1, "val_tokens": 512},
    {"step": 3, "train_loss": 8.0, "lr": 0.003, "tokens_per_s": 1000.0, "final": False},
]


def tensorboard_scalars(log_dir):
    """{tag: [(step, value)]} as TensorBoard itself reads the directory (purges applied; a tag whose every point was
    purged has nothing to draw and is left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return {tag: points for tag, points in scalars.items() if points}


def expected(records):
    out = {}
    for record in records:
        for key, value in tracking.scalars_of(record).items():
            out.setdefault(key, []).append((record["step"], pytest.approx(value, rel=1e-6)))
    return out


def log_all(trackers, records):
    for record in records:
        for tracker in trackers:
            tracker.log(tracking.scalars_of(record), record["step"])


def test_scalars_are_the_numeric_fields_under_their_metrics_names():
    assert tracking.scalars_of({"step": 5, "val_loss": 2, "final": True, "note": "x"}) == {"val_loss": 2.0}


def test_tensorboard_events_read_back_equal_the_records(tmp_path):
    [tb] = tracking.open_trackers(["tensorboard"], tmp_path, "run", {}, resume_step=None)
    log_all([tb], RECORDS)
    tb.close()
    assert tensorboard_scalars(tmp_path / "runs") == expected(RECORDS)


def test_a_resumed_run_continues_the_same_tensorboard_run_without_the_killed_steps(tmp_path):
    [tb] = tracking.open_trackers(["tensorboard"], tmp_path, "run", {}, resume_step=None)
    log_all([tb], RECORDS)  # the killed run got to step 3; its checkpoint is at step 2
    tb.close()
    resumed = [{"step": 3, "train_loss": 7.5, "lr": 0.003, "tokens_per_s": 990.0},
               {"step": 4, "train_loss": 7.0, "lr": 0.004, "tokens_per_s": 995.0}]
    [tb] = tracking.open_trackers(["tensorboard"], tmp_path, "run", {}, resume_step=2, kept=RECORDS[:3])
    log_all([tb], resumed)
    tb.close()
    assert tensorboard_scalars(tmp_path / "runs") == expected(RECORDS[:3] + resumed)


def test_a_finished_run_extended_by_resume_loses_its_final_record_in_tensorboard_too(tmp_path):
    """metrics.jsonl drops the final record (at the checkpoint's step) on --resume; TensorBoard hides it too, and
    keeps the records metrics.jsonl keeps at that step."""
    final = {"step": 2, "val_loss": 9.4, "n_params": 1234, "final": True}
    [tb] = tracking.open_trackers(["tensorboard"], tmp_path, "run", {}, resume_step=None)
    log_all([tb], RECORDS[:3] + [final])
    tb.close()
    resumed = [{"step": 3, "train_loss": 7.5, "lr": 0.003, "tokens_per_s": 990.0}]
    [tb] = tracking.open_trackers(["tensorboard"], tmp_path, "run", {}, resume_step=2, kept=RECORDS[:3])
    log_all([tb], resumed)
    tb.close()
    assert tensorboard_scalars(tmp_path / "runs") == expected(RECORDS[:3] + resumed)


def test_trackio_logs_locally_and_reads_back(tmp_path):
    """trackio in a fresh process (its store is fixed at import from TRACKIO_DIR), nothing sent anywhere."""
    code = """
import json
from pathlib import Path
from toygpt import tracking
from trackio.sqlite_storage import SQLiteStorage
records = json.loads(Path("records.json").read_text())
[tracker] = tracking.open_trackers(["trackio"], Path("."), "my-run", {"lr": 0.003}, resume_step=None)
for r in records:
    tracker.log(tracking.scalars_of(r), r["step"])
tracker.close()
logs = SQLiteStorage.get_logs(tracking.PROJECT, "my-run")
print(json.dumps([{k: v for k, v in log.items() if k != "timestamp"} for log in logs]))
"""
    import json

    (tmp_path / "records.json").write_text(json.dumps(RECORDS))
    env = {"TRACKIO_DIR": str(tmp_path / "trackio"), "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    out = run_python(code, cwd=tmp_path, env=env)
    logs = json.loads(out.strip().splitlines()[-1])
    got = {}
    for log in logs:
        for key, value in log.items():
            if key != "step":
                got.setdefault(key, []).append((log["step"], value))
    assert got == expected(RECORDS)
    assert (tmp_path / "trackio" / "toygpt.db").is_file()


def test_report_to_names_and_meaning(monkeypatch):
    assert tracking.check_report_to(["none"]) == []
    assert tracking.check_report_to(["tensorboard", "trackio", "tensorboard"]) == ["tensorboard", "trackio"]
    monkeypatch.setattr(tracking, "installed", lambda name: name != "wandb")
    assert tracking.check_report_to(["all"]) == ["tensorboard", "trackio"]
    with pytest.raises(tracking.TrackingError, match=r"wandb package is not installed; `pip install wandb`.*wandb login"):
        tracking.check_report_to(["wandb"])
    with pytest.raises(tracking.TrackingError, match="none cannot be combined"):
        tracking.check_report_to(["none", "tensorboard"])
    with pytest.raises(tracking.TrackingError, match="unknown comet"):
        tracking.check_report_to(["comet"])
