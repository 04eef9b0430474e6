"""Checks that a compiled graph still computes what the model does: the per-pass numeric check
(`--verify-each-pass`, hooked into the pass manager by the compiler) and simulated ranks that run
a sharded module's every rank as a thread of one process."""
