"""ShapeNetPart part segmentation: data reader, model, metric, fine-tune and evaluation."""
