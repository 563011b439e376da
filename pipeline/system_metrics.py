"""CPU, memory, disk and network use (GPU with nvidia-ml-py on CUDA) of a run, as MLflow system metrics.

MLflow's own monitor, bound to the run and the store explicitly (no fluent `start_run`): metrics
`system/cpu_utilization_percentage`, `system/system_memory_usage_megabytes`, ... every `interval`
seconds. It needs psutil (requirements.txt). It logs only while the run is RUNNING, so enter it
inside `Tracker.active(run_id)`.
"""

import contextlib
import logging
import sys

from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

from pipeline.files import SQLITE_WRITE_FAULTS
from pipeline.stores import problem
from pipeline.tracking import Tracker


@contextlib.contextmanager
def system_metrics(tracker: Tracker, run_id: str, enabled: bool = True, interval: float = 10.0):
    """Record the run's system metrics while the block runs; a resumed run continues their steps."""
    if not enabled:
        yield
        return
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no "started/stopped" lines in the output
    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval, resume_logging=True, tracking_uri=tracker.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
        try:  # what was sampled since the last log: all of a run shorter than `interval`
            if metrics := monitor.aggregate_metrics():
                monitor.publish_metrics(metrics)
                monitor.mlflow_logger.flush()
        except Exception as e:  # the run's own outcome matters more than its last system metrics
            if not any(fault in str(e) for fault in SQLITE_WRITE_FAULTS):  # a full disk: the run's error says so
                print(f"warning: could not log the last system metrics of run {run_id}: {problem(e)}", file=sys.stderr)
