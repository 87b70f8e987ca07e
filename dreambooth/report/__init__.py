"""The run's report.html: summary, loss curve, training data and the validation sweep."""
