"""An OpenAI-compatible HTTP server on the engine's request router (FastAPI + uvicorn), with
Prometheus metrics and Ray Serve scale-out. `gpt2-engine serve` runs it (gpt2_engine.server.serve)."""
