"""Analysis of fedsim runs: readers of results folders (`results`), plots (`plots`), cost models."""
