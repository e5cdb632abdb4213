"""OFT (orthogonal fine-tuning): a block-diagonal rotation of each adapted layer's input, in peft's file format."""
