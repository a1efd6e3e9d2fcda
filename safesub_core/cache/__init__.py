"""The disk cache of results: `store` (DiskCache, the content-addressed folder: keys, layout, atomic writes, locks,
checksums, the size cap) and `codec` (canonical key parts and the value kinds, stored without pickle).

`from safesub_core.cache import DiskCache, cache_root` is the public surface; the folder is `settings.cache_root()`
(SAFESUB_CACHE, else <repo>/cache).
"""
from safesub_core.cache.store import DiskCache, cache_root

__all__ = ["DiskCache", "cache_root"]
