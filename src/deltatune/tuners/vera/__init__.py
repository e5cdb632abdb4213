"""VeRA (Kopiczko et al., 2024): shared frozen random projections, trained scaling vectors (peft's VeRA)."""
