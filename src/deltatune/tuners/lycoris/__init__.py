"""The LyCORIS family: LoHa (Hadamard product of low-rank factors) and LoKr (Kronecker product)."""
