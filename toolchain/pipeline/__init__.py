"""The pipeline: run directories, manifests and keys (runs), the stage table (plans) and the runner that takes a
recipe through the stages (runner, the one module of this package above the stages)."""
