"""3D object detection on ScanNet: VoteNet/3DETR data preparation, a 3DETR detector whose encoder is the
pre-trained backbone, its set loss, and the VoteNet/3DETR average-precision protocol."""
