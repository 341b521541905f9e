"""kvtool's codec as an LMCache serde (``"serde": {"type": "kvtool", ...}`` on an L2 adapter).

Importing this package registers the serde with LMCache (``register_serde_factory``; idempotent). LMCache has no
plugin discovery, so the registration must run in the LMCache server process before it builds its storage adapters:
start the server through ``python -m kvtool.integrations.lmcache.server <its usual arguments>``
(``docs/lmcache.md``).
"""

from kvtool.integrations.lmcache.serde import (
    SERDE_TYPE,
    KvtoolDeserializer,
    KvtoolSerializer,
    create_kvtool_serde,
    register,
)

register()

__all__ = ["SERDE_TYPE", "KvtoolDeserializer", "KvtoolSerializer", "create_kvtool_serde", "register"]
