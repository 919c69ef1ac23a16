"""--report-to: the tracker gets the numbers of metrics.jsonl, the settings and the run name."""

import json

import numpy as np
import pytest

from common.args import TrainingArguments, parse_args
from common.errors import UserError
from common.train import tracker_config
from conftest import run_script

pytest.importorskip("tensorboard")


def metrics_as_scalars(run_dir):
    """{tag: [(step, value as float32)]} of metrics.jsonl: TensorBoard stores float32."""
    scalars = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                scalars.setdefault(key, []).append((row["step"], float(np.float32(value))))
    return scalars


def tensorboard_scalars(run_dir):
    """The same, read back with TensorBoard's own reader, and the hyper-parameters logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    runs = list((run_dir / "tensorboard").iterdir())
    assert [r.name for r in runs] == [run_dir.name]  # one run, named by its output directory
    events = EventAccumulator(str(runs[0]))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    hparams = {}
    for sub_run in runs[0].iterdir():  # add_hparams writes the settings as a run of its own
        if sub_run.is_dir() and any(sub_run.glob("events.*")):
            accumulator = EventAccumulator(str(sub_run))
            accumulator.Reload()
            for content in accumulator.PluginTagToContent("hparams").values():
                data = plugin_data_pb2.HParamsPluginData.FromString(content)
                if data.HasField("session_start_info"):
                    for key, value in data.session_start_info.hparams.items():
                        hparams[key] = value.WhichOneof("kind") and getattr(
                            value, value.WhichOneof("kind"))
    return scalars, hparams


@pytest.mark.slow
def test_tensorboard_scalars_equal_metrics_jsonl_also_after_a_resume(tiny, tmp_path):
    out = tmp_path / "kd_run"
    flags = ["--teacher", tiny / "teacher", "--student", tiny / "student", "--dataset",
             tiny / "train.jsonl", "--eval-dataset", tiny / "test.jsonl", "--eval-steps", "2",
             "--output-dir", out, "--max-steps", "4", "--batch-size", "4", "--log-steps", "1",
             "--save-steps", "2", "--learning-rate", "1e-3", "--report-to", "tensorboard"]
    run_script("token_level.py", *flags)
    expected = metrics_as_scalars(out)
    assert {"loss", "kd", "lr", "grad_norm", "eval_loss", "tokens_per_second"} <= set(expected)
    assert [step for step, _ in expected["eval_loss"]] == [2, 4]
    scalars, hparams = tensorboard_scalars(out)
    assert scalars == expected
    assert hparams["run_name"] == "kd_run" and hparams["method"] == "token_level"
    assert hparams["training.learning_rate"] == pytest.approx(1e-3)
    assert hparams["training.report_to"] == "tensorboard"
    assert hparams["model.teacher"] == str(tiny / "teacher")

    # Make it an unfinished run with a checkpoint at step 2 and rows up to step 4, then resume:
    # both metrics.jsonl and the event files must drop steps 3-4 of the first attempt.
    for name in json.loads((out / "run_config.json").read_text())["files"]:
        (out / name).unlink()
    (out / "run_config.json").unlink()
    run_script("token_level.py", *flags, "--resume")
    resumed = metrics_as_scalars(out)
    assert [step for step, _ in resumed["loss"]] == [1, 2, 3, 4]
    assert tensorboard_scalars(out)[0] == resumed


def test_report_to_a_tracker_that_is_not_installed(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("wandb", "mlflow", "trackio")
                        else real_find_spec(name, *a))
    with pytest.raises(UserError) as error:
        parse_args((TrainingArguments,), ["--output-dir", "o", "--report-to", "wandb"])
    assert str(error.value) == ("--report-to wandb needs the wandb package, which is not "
                                "installed: pip install wandb (or --report-to none)")
    from common.args import installed_trackers

    assert installed_trackers("all") == ["tensorboard"]  # "all" = the installed ones
    assert installed_trackers("none") == []
    with pytest.raises(UserError, match="invalid choice: 'tensorbord'"):
        parse_args((TrainingArguments,), ["--output-dir", "o", "--report-to", "tensorbord"])


def test_tracker_config_is_flat_scalars():
    args = TrainingArguments(output_dir="runs/kd")
    config = tracker_config({"method": "token_level", "command": "token_level.py ...",
                             "model": {"teacher": "t", "student": None},
                             "lora": {"target_modules": ["q_proj", "v_proj"]},
                             "versions": {"torch": "2.13.0"}}, args)
    assert config == {"run_name": "kd", "method": "token_level", "command": "token_level.py ...",
                      "model.teacher": "t", "lora.target_modules": "q_proj,v_proj",
                      "versions.torch": "2.13.0"}
