"""Where work runs: a model host and its tasks, in this process or on Ray workers."""
