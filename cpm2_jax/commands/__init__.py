"""Sub-commands of the `cpm2` console script, one module each."""
