"""The local hub (tests/hub_server.py) with the bench's repository, in a process of its own.

The hub a deployment talks to is another machine: served from a thread of the bench, its answers to the web
server would wait for the interpreter lock behind the bench's twenty client threads. Here it shares only the
cores. It prints its environment (one JSON line) once it serves; then, for each line on its standard input,
the number of requests it has answered; it stops when its standard input closes.

    python -m bench.hub_process <hub cache folder>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO_ID = "bench-org/llama-3.2-1b-shaped"


def main(cache: str) -> None:
    from tests.hub_server import HubServer, llama_1b_files

    hub = HubServer(Path(cache)).start()
    hub.add_repo(REPO_ID, llama_1b_files())
    print(json.dumps(hub.env), flush=True)
    for _line in sys.stdin:  # until the bench closes it
        print(len(hub.requests), flush=True)
    hub.stop()


if __name__ == "__main__":
    main(sys.argv[1])
