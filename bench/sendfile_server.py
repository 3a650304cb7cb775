"""The downloads baseline: `cat`-ing files to a socket, done the fastest way the kernel offers (sendfile).

    python bench/sendfile_server.py FILE [FILE ...]

Prints the port it listens on (127.0.0.1 only), then serves connections one at a time: the client sends
one line, "all" (every file, in order: the archive's bytes) or "one N" (file N only), and gets those bytes
with socket.sendfile, then the connection closes. Exits when its parent closes stdin or after an hour.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from pathlib import Path


def serve(paths: list[Path], listener: socket.socket) -> None:
    while True:
        conn, _addr = listener.accept()
        with conn:
            line = b""
            while not line.endswith(b"\n") and len(line) < 100:
                chunk = conn.recv(100)
                if not chunk:
                    break
                line += chunk
            words = line.decode().split()
            chosen = paths if words[:1] == ["all"] else [paths[int(words[1])]]
            for path in chosen:
                with path.open("rb") as handle:
                    conn.sendfile(handle)
            conn.shutdown(socket.SHUT_WR)


def main() -> int:
    paths = [Path(p) for p in sys.argv[1:]]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    print(listener.getsockname()[1], flush=True)
    threading.Thread(target=serve, args=(paths, listener), daemon=True).start()
    deadline = time.monotonic() + 3600
    # Stop with the parent: stdin closes when the harness ends (or is killed).
    while time.monotonic() < deadline and sys.stdin.read(1):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
