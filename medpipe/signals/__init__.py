"""Physiological signals (ECG): readers, windows, store, models."""
