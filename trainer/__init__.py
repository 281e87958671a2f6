"""Stage two of pcd: the student, pre-training by distillation, and downstream fine-tuning."""
