"""``python -m kvtool.integrations.lmcache.server [LMCache MP server arguments]``: LMCache's MP server
(``python -m lmcache.v1.multiprocess.http_server``, what ``lmcache.mp.autostart`` spawns) with the ``kvtool`` serde
registered first. LMCache builds its L2 adapters, and their serdes, while the server starts and offers no plugin
discovery, so the registration has to happen in this process before that; every argument is passed on unchanged,
e.g. ``--l2-adapter '{"type": "fs", "base_path": "/data/kv", "serde": {"type": "kvtool", "bits": 2.0}}'``.

Exit 1 with one line on stderr when LMCache (or kvtool's serde) cannot be imported.
"""

from __future__ import annotations

import runpy
import sys

SERVER_MODULE = "lmcache.v1.multiprocess.http_server"


def main(argv: list[str] | None = None) -> int:
    try:
        import kvtool.integrations.lmcache  # noqa: F401 - registers the serde
    except ImportError as e:
        print(f"Error: the kvtool LMCache serde needs LMCache >= 0.5.6 ({e}); pip install 'kvtool[lmcache]'",
              file=sys.stderr)  # fmt: skip
        return 1
    sys.argv = [SERVER_MODULE, *(sys.argv[1:] if argv is None else argv)]
    runpy.run_module(SERVER_MODULE, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
