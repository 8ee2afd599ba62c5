"""The one asking loop (toolchain.backends.asking): arrival order with a failure that stops new requests but keeps
what is in flight, windows that ask again what is still wanted, a resumable answer log."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from toolchain.backends.asking import AnswerLog, in_arrival_order, windows


def test_answers_land_as_they_arrive_with_at_most_workers_in_flight():
    lock, state, got = threading.Lock(), {"now": 0, "most": 0}, []

    def ask(i):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.02 * ((7 * i) % 5))  # later jobs may finish first
        with lock:
            state["now"] -= 1
        return i

    with ThreadPoolExecutor(3) as pool:
        in_arrival_order(pool, 3, ask, range(12), got.append)
    assert sorted(got) == list(range(12)) and got != list(range(12))
    assert 1 < state["most"] <= 3


def test_a_failure_stops_new_requests_lands_those_in_flight_and_is_raised():
    asked, got = [], []
    release = threading.Event()

    def ask(i):
        asked.append(i)
        if i == 1:
            raise RuntimeError("endpoint said no")
        if i in (0, 2):
            release.wait(2)  # in flight when job 1 fails
        return i

    def on_answer(i):
        got.append(i)

    with ThreadPoolExecutor(3) as pool:
        threading.Timer(0.2, release.set).start()
        with pytest.raises(RuntimeError, match="endpoint said no"):
            in_arrival_order(pool, 3, ask, range(10), on_answer)
    assert sorted(got) == [0, 2]  # the answers in flight were kept
    assert max(asked) < 5  # no new request after the failure was seen


def test_windows_ask_again_what_is_still_wanted():
    full: set[str] = set()
    seen = []
    jobs = [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("c", 1)]
    for window in windows(jobs, 2, wanted=lambda job: job[0] not in full):
        seen.append(window)
        full.add("a")  # task a fills up after the first window
    assert seen == [[("a", 1), ("b", 1)], [("b", 2), ("c", 1)]]


def test_the_answer_log_resumes_after_a_partial_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"job": "x", "n": 1}\n{"job": "y", "n"')  # killed mid-write
    log = AnswerLog(path, key=lambda r: r["job"])
    assert log.done == {"x"} and [r["n"] for r in log.rows] == [1]
    with log:
        log.write({"job": "y", "n": 2})
    again = AnswerLog(path, key=lambda r: r["job"])
    assert again.done == {"x", "y"} and path.read_text().count("\n") == 2
