"""The eager decode engine: prefill, decode, sample, stop, compress, count; and teacher-forced replay."""
