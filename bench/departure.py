"""How long a client's departure holds up the daemon's other clients.

``python -m bench.departure [--ring-mib 256] [--reps 5]``

One external daemon. Each round a client with a ring of ``--ring-mib`` MiB (the client's
default: 256) saves one variable almost as large (so the daemon has mapped and populated
the whole ring), then another client PINGs the daemon in a loop while the first closes
its spool (BYE: the daemon lets go of its ring). Printed: the longest PING round trip in
the 0.5 s around the departure, per round and their median. Before ``ringio.unmap_later``
the control thread unmapped the ring itself.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time

import numpy as np

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    import zmq

    import matspool

    from .producers import _start_daemon, _stop_daemon

    p = argparse.ArgumentParser(prog="python -m bench.departure")
    p.add_argument("--ring-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "out"))
    a = p.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="departure-", dir=a.dir)
    proc, endpoint, sockdir = _start_daemon(d)
    ctx = zmq.Context.instance()
    worst = []
    try:
        arr = np.ones((1024, ((a.ring_mib - 1) << 20) // 8 // 1024))
        for _ in range(a.reps):
            s = matspool.Spool(endpoint, ring_bytes=a.ring_mib << 20, timeout=60)
            s.save(os.path.join(d, "x.mat"), {"x": arr}, format="v7.3").result()
            rtts: list[float] = []
            stop = threading.Event()

            def ping(rtts: list[float], stop: threading.Event) -> None:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(endpoint)
                while not stop.is_set():
                    t0 = time.monotonic()
                    sock.send_multipart([b"matspool/1", b'{"op":"PING"}'])
                    if sock.poll(5000):
                        sock.recv_multipart()
                        rtts.append(time.monotonic() - t0)
                sock.close()

            t = threading.Thread(target=ping, args=(rtts, stop))
            t.start()
            time.sleep(0.2)
            s.close()
            time.sleep(0.3)
            stop.set()
            t.join()
            worst.append(max(rtts))
    finally:
        _stop_daemon(proc, sockdir)
        for name in os.listdir(d):
            os.unlink(os.path.join(d, name))
        os.rmdir(d)
    ms = [round(w * 1e3, 1) for w in worst]
    print(
        f"longest PING round trip around the BYE of a client with a {a.ring_mib} MiB ring: "
        f"median {statistics.median(worst) * 1e3:.1f} ms, rounds {ms}"
    )


if __name__ == "__main__":
    main()
