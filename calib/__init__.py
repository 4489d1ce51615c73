"""Calibration-data synthesis (installed as edgecompress.calib)."""
