"""Run-time helpers every consumer imports downward: embedded assets, atomic writes, threads,
checkpoints, distributed runs, quantisation options, model loading."""
