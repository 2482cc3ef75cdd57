"""Tests that run ON the device, shipped inside every bundle (installed as edgekit.device_tests).

Through the agent, or by hand in an unpacked bundle:  python -m pytest device_tests [--artifact DIR] [--budget-mb N]
"""
