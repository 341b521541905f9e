"""Calibrators: offline, per-model methods that write ``kvtool.kv_calibration`` artifacts (one method per file)."""
