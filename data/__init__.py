"""The data path shared by training and inference: QA samples joined with the store, tokenised, batched."""
