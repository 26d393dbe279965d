"""Calibration on text: per-layer statistics, codebooks, bit allocation, model risk (see `kvsqueeze calibrate`)."""
