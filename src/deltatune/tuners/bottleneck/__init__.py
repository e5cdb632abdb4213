"""Bottleneck adapters (Houlsby et al., 2019; Pfeiffer et al., 2020)."""
