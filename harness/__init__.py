"""What the tests and the benchmarks share: launching jobs, test hosts and a Slurm cluster, reading a run's metrics,
generated data, and the fault scenarios and bad inputs both exercise. Imported by tests/ and bench/, never the
other way round."""
