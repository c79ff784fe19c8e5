"""The export format version, shared with the runtime's cache keys (`ripper_dist.export_cache`). Bump it when an
exporter change alters the graphs, so cached exports made before are redone. No torch here: the runtime imports it."""
EXPORT_VERSION = "2"

# The RoFormer exporter's own revision, in its cache keys beside EXPORT_VERSION: a RoFormer-only graph change redoes
# RoFormer exports without redoing every Demucs export. "2": the time transformer's attention one head at a time.
ROFORMER_GRAPH_VERSION = "2"
