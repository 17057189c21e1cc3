"""Models: the repository (config.pbtxt, versions, labels, files), the options and rules a
config implies, warm-up, loading (plan, instances, schedulers) and the registry of ready
models with its atomic reloads."""
