"""IR-in / IR-out tests of the passes, one file per pass (a package, so their names do not clash with tests/test_shard_tp.py and friends)."""
