"""The export format version, shared with the runtime's cache keys (`ripper_dist.export_cache`). Bump it when an
exporter change alters the graphs, so cached exports made before are redone. No torch here: the runtime imports it."""
EXPORT_VERSION = "2"
