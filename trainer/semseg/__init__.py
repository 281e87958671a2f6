"""ScanNet semantic segmentation (20 benchmark classes): data, model, metric, fine-tune, evaluation, prediction."""
