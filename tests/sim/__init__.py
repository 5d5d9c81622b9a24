"""A seeded, deterministic, in-process simulation of a lamina cluster under faults."""
