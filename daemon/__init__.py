"""The loracache daemon: sessions, leases, per-device LRU caches and loaders behind a socket."""
