"""The running shim: what `unicorn-shim run` imports, and nothing else."""
