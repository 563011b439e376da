"""pipeline/system_metrics.py: MLflow's system metrics for a run started through the client."""

import time

import pytest

from pipeline.system_metrics import system_metrics


def system_keys(tracker, run_id) -> set[str]:
    return {key for key in tracker.client.get_run(run_id).data.metrics if key.startswith("system/")}


@pytest.mark.parametrize("interval, seconds", [(0.2, 0.7), (30, 0.2)])  # several samples; one, shorter than a period
def test_a_run_records_cpu_and_memory(tracker, interval, seconds):
    run_id = tracker.start_run("toy", "toy", {}, {})
    with tracker.active(run_id), system_metrics(tracker, run_id, interval=interval):
        time.sleep(seconds)
    keys = system_keys(tracker, run_id)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys
    history = tracker.client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
    assert history and all(m.value > 0 for m in history)


def test_switched_off_it_records_nothing(tracker):
    run_id = tracker.start_run("toy", "toy", {}, {})
    with tracker.active(run_id), system_metrics(tracker, run_id, enabled=False):
        time.sleep(0.3)
    assert system_keys(tracker, run_id) == set()
