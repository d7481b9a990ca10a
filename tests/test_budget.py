"""The owner's budget of chunk data in flight, against the garbage collector."""

from __future__ import annotations

import gc
import threading

from objdl.downloader._budget import InFlight

MiB = 1024 * 1024


def test_a_release_by_a_collection_inside_the_budgets_lock_does_not_deadlock() -> None:
    """A tracked view caught in a reference cycle is freed by the garbage collector,
    which may run at any allocation, also inside one of the budget's own locked
    sections (``stats()`` copies a dict there): its finalizer must not wait for the
    lock its own thread holds."""
    budget = InFlight()
    was_enabled = gc.isenabled()
    gc.disable()  # so the cycle is collected where this test says, not before
    try:
        data, why = budget.charge("s", bytes(MiB))
        assert why is None and budget.held("s") == MiB
        cycle: list = [data]
        cycle.append(cycle)
        del data, cycle
        done = threading.Event()

        def collect_while_locked() -> None:
            with budget._lock:  # as a collection during stats()' dict copy would be
                gc.collect()
            done.set()

        t = threading.Thread(target=collect_while_locked, daemon=True)
        t.start()
        assert done.wait(5.0), "the budget's finalizer deadlocked on the budget's own lock"
        t.join(5.0)
    finally:
        if was_enabled:
            gc.enable()
    assert budget.held() == 0 and budget.held("s") == 0
    assert budget.stats()["by_site"] == {}
