"""Tests for fedsilo.privacy: DP events, accounting and calibration."""
