"""The core: optimizer base, transforms and chaining, hyperparameters, groups, registry, non-finite policy."""
