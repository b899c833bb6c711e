"""The optimizer and its learning-rate schedules: the owner of the `optim` config section."""
