"""The on-device benchmark agent: standard library + psutil + the artifact's runtime, never torch.

bundle.py (tar bundles, shared by host and agent), jobs.py (persistent queue, one worker), server.py (HTTP API),
client.py (the host side), device.py (what the device is), tegrastats.py (Jetson sampling).
"""
