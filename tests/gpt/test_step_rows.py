"""gpt.step_rows: one sequence's forward is marked for its own thread only, and unmarked after."""

import threading

from gpt import step_rows


def test_one_sequence_is_marked_on_its_own_thread_only_and_nests():
    seen = []
    with step_rows.one_sequence():
        with step_rows.one_sequence():
            assert step_rows.active()
        assert step_rows.active()  # still inside the outer one
        t = threading.Thread(target=lambda: seen.append(step_rows.active()))
        t.start()
        t.join()
    assert seen == [False]  # another engine's thread keeps its own kernels
    assert not step_rows.active()


def test_an_exception_inside_leaves_the_thread_unmarked():
    try:
        with step_rows.one_sequence():
            raise RuntimeError("a failed forward")
    except RuntimeError:
        pass
    assert not step_rows.active()
