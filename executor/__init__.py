"""executor: a real PyTorch multi-process pipeline that decodes with AR, PP and SPD."""
