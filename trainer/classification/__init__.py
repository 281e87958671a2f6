"""Classification: data, model and metric."""
