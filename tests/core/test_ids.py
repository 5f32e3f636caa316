"""Entry and hold ids: unique across threads, and across a fork's parent and child."""

from __future__ import annotations

import json
import os
import sys
import threading

import pytest

from creditmeter._ids import new_id


def test_ids_from_many_threads_are_all_different():
    made: list[list[str]] = [[] for _ in range(8)]

    def draw(into: list[str]) -> None:
        into.extend(new_id() for _ in range(5_000))

    threads = [threading.Thread(target=draw, args=(into,)) for into in made]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    ids = [i for into in made for i in into]
    assert len(ids) == 40_000
    assert len(set(ids)) == 40_000


def test_an_id_is_text_and_the_next_one_differs():
    first, second = new_id(), new_id()
    assert isinstance(first, str)
    assert first != second
    assert int(first, 16) + 1 == int(second, 16)  # one counter, one step


@pytest.mark.skipif(sys.platform == "win32", reason="os.fork")
def test_a_forked_child_draws_ids_the_parent_never_draws():
    before = new_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, then out
        try:
            os.write(write, json.dumps([new_id() for _ in range(1_000)]).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert status == 0
    parent = [new_id() for _ in range(1_000)]
    assert len(child) == 1_000
    assert not set(child) & set(parent)
    assert before not in child
    # The child drew a new prefix: its counter does not follow the parent's.
    assert int(child[0], 16) >> 64 != int(before, 16) >> 64
