"""The driver's collector settings hold only while it runs (launcher/batch/dispatch.py fewer_collections)."""
import gc

from fleetgen.launcher.batch.dispatch import GC_THRESHOLDS, fewer_collections


def test_collections_are_rarer_during_a_run_and_as_before_after_it():
    before = gc.get_threshold()
    with fewer_collections():
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
