"""Sessions that outlive a process: a backend that keeps session blobs (`toyllm_core.serving.snapshot`)
and the worker that writes them behind the engine.

- `backend.py`: the interface (save, load, delete, list, lease) and `open_backend(url)`;
- `directory.py`: a local directory, the default: one server's sessions survive its restart;
- `redis.py`: a Redis server, for replicas that share sessions (leases make one request at a time
  hold a session across all of them);
- `writer.py`: `Persistence`, what the server calls: write after each turn (on its own thread),
  write everything at shutdown, load a session this process does not hold.
"""

from .backend import Backend, open_backend
from .writer import Persistence, SessionLost

__all__ = ["Backend", "Persistence", "SessionLost", "open_backend"]
