"""An OpenAI-compatible HTTP server over the engine core (`dynts serve`): request validation, the reasoning split,
incremental detokenization with stop strings, the thread that owns the model, Prometheus metrics, the FastAPI app,
and its Ray Serve deployment. Only ray_serve.py imports ray.serve; fastapi and uvicorn come from the `serve` extra.
"""
