"""The evaluation harness: datasets, prompts, grading, metrics, the resumable result store, reports."""
