"""The importance predictor pipeline: answer-attention labels for collected traces, and head training."""
