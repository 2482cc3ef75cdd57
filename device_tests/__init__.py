"""Tests shipped inside every artifact bundle and run on the device (installed as edgekit.device_tests)."""
