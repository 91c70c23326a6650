"""The Ray runtime: ClientWorker actors, an Aggregator actor, and the driver that runs the rounds."""

from fedsim.runtime.driver import run, run_comparison

__all__ = ["run", "run_comparison"]
