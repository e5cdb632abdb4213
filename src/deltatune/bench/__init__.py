"""Benchmarks: deltatune against peft, TRL and the frozen floor, measured side by side in one run.
Nothing in the library imports this package."""
