"""pytest plugin of the GPU run (bench.gpu_suite loads it with `-p bench.suite_plugin` into every tier).

- Appends each test's outcome, and each benchmark row (bench.harness.measure), to the results file the
  moment it is known (bench.results); a "started" record first, so that bench.gpu_suite can tell which
  test a killed process was running.
- Skips every test that would start after the budget's deadline.
- Per-test timeout (a torch.compile case has its own, longer one): a test running longer ends the process
  (faulthandler prints where it hung into the log); bench.gpu_suite records it as timed out and runs the
  rest of the tier in a new process. A hung kernel cannot be interrupted from Python, so only ending the
  process is sure to work.
"""
import faulthandler
import time

import pytest

from bench import results


def pytest_addoption(parser):
    group = parser.getgroup("lfm GPU run (bench.gpu_suite)")
    group.addoption("--suite-results", default=None, metavar="FILE", help="append records to this JSON-lines file")
    group.addoption("--suite-tier", default=None, help="the tier this run is (benchmarks select by it)")
    group.addoption("--suite-deadline", type=float, default=None, metavar="EPOCH_S",
                    help="skip the tests that would start after this time.time()")
    group.addoption("--suite-test-timeout", type=float, default=None, metavar="S",
                    help="end the process when one test runs longer")
    group.addoption("--suite-compile-timeout", type=float, default=None, metavar="S",
                    help="the same for a torch.compile case (compiles)")


def compiles(nodeid: str) -> bool:
    """Whether a test is a torch.compile provider's case (bench/conftest.py parametrizes the provider first)."""
    return "[compile-" in nodeid


_tier = None  # this process's --suite-tier, for the records


def pytest_configure(config):
    global _tier
    results.ACTIVE_FILE = config.getoption("suite_results")
    _tier = config.getoption("suite_tier")


def time_left(config) -> float:
    """Seconds until the deadline (infinite without one, or without this plugin)."""
    deadline = config.getoption("suite_deadline", None)
    return float("inf") if deadline is None else deadline - time.time()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item):
    results.record("test", test=item.nodeid, tier=_tier, outcome="started",
                   at=time.time())
    timeout = item.config.getoption("suite_compile_timeout" if compiles(item.nodeid) else "suite_test_timeout")
    if timeout:
        faulthandler.dump_traceback_later(timeout, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if time_left(item.config) <= 0:
        pytest.skip("the run's time budget is spent")


def pytest_runtest_logreport(report):
    # One final record per test: the call phase, or setup when it skipped or failed there, or a failing teardown.
    final = report.when == "call" or (report.when == "setup" and not report.passed) or \
        (report.when == "teardown" and report.failed)
    if not final:
        return
    reason = ""
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
    elif report.failed:
        reason = report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash") else str(report.longrepr)
    results.record("test", test=report.nodeid, tier=_tier, outcome=report.outcome, reason=reason[:500],
                   duration_s=round(report.duration, 3))

