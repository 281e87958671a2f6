"""Object classification (ModelNet40, ScanObjectNN): data readers, point selection and metrics."""
