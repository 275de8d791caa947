"""bench.train_vs_local's lockstep mode: two sides that train at once take their epochs in turn."""

from __future__ import annotations

import threading

from bench.train_vs_local import Turnstile


def test_two_sides_alternate_epochs_and_wait_for_each_other_at_the_end(tmp_path):
    outs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    Turnstile.setup(tmp_path / "turns", "ray", outs)
    order, lock = [], threading.Lock()

    def side(name: str, epochs: int) -> None:
        gate = Turnstile.of(str(outs[name]))
        assert gate.side == name
        gate.ready()
        for epoch in range(1, epochs + 1):
            gate.wait()
            with lock:
                order.append(f"{name}{epoch}")
            gate.hand_over(last=epoch == epochs)
        with lock:
            order.append(f"{name}-end")

    threads = [threading.Thread(target=side, args=(name, 3)) for name in ("local", "ray")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert order[:6] == ["ray1", "local1", "ray2", "local2", "ray3", "local3"]
    assert sorted(order[6:]) == ["local-end", "ray-end"]  # neither ends before the other's last epoch


def test_a_side_that_is_done_no_longer_blocks_the_other(tmp_path):
    outs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    Turnstile.setup(tmp_path / "turns", "ray", outs)
    (tmp_path / "turns" / "done_ray").touch()  # e.g. the Ray side failed before its first epoch
    gate = Turnstile.of(str(outs["local"]))
    gate.wait()  # returns at once
    gate.hand_over(last=True)  # and does not wait for a side that is gone


def test_the_second_side_starts_up_after_the_first_and_no_epoch_starts_before_both_have(tmp_path):
    outs = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    Turnstile.setup(tmp_path / "turns", "ray", outs)
    ray, local = Turnstile.of(str(outs["ray"])), Turnstile.of(str(outs["local"]))
    launch = threading.Thread(target=Turnstile.wait_ready, args=(tmp_path / "turns", "ray"))
    launch.start()
    launch.join(timeout=0.2)
    assert launch.is_alive()  # the local side is not launched while the Ray side starts up
    ray.ready()
    launch.join(timeout=5)
    assert not launch.is_alive()
    assert not ray._mine()  # its turn, but it waits while the local side starts up
    local.ready()
    assert ray._mine() and not local._mine()
