"""Parallel layout: the ('data', 'model') mesh, logical-axis rules, shardings, multi-host start."""
