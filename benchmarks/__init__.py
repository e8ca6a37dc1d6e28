"""Benchmarks of fed-asr: step time and memory, descriptors, communication, simulation.

Run each as ``python -m benchmarks.<name>`` from the repository root; see
``BENCHMARKS.md`` for the commands and the measured tables.
"""
