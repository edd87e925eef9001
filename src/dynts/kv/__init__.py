"""The budgeted KV cache (fixed capacity, per-sequence lengths, in-place compaction) and the attention function
registered with transformers that masks by those lengths and shows policies what they observe."""
