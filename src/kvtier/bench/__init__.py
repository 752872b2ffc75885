"""kvtier.bench: workloads, benchmark runners and plots (may use every layer)."""
