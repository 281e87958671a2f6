"""Object classification (ModelNet40, ScanObjectNN): data readers, model, metric, fine-tune and evaluation."""
