"""How much memory this machine has free: what a memory-hungry step checks before it starts."""

from __future__ import annotations


def available_bytes() -> int | None:
    """The memory available now (Linux MemAvailable); None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
