"""A user's own code, as a test fixture: data factories, a model, a loss, callbacks (named by `_target_`)."""
