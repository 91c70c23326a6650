"""Local training: one engine trains any number of clients (``fedsim.training.engine``), and the rules that shape it."""
