"""The `emoe` command line: above both the cluster and the benchmarks (it starts either)."""
