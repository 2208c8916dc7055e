"""Research code: studies of the predictors that the library does not import."""
