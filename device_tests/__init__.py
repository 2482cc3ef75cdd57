"""Tests shipped inside every artifact bundle and run on the device (installed as edgekit.device_tests).

Through the agent, or by hand in an unpacked bundle:  python -m pytest device_tests [--artifact DIR] [--budget-mb N]
"""
