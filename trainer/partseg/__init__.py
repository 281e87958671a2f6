"""ShapeNetPart part segmentation: data reader and metrics."""
