"""Driver-side executors: run batches on the workers and hand back futures."""
