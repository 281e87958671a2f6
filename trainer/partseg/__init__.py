"""Part segmentation: data, model and metric."""
