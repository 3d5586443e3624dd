"""`palionnx serve`: captions over HTTP (the `serve` extra: Starlette on uvicorn)."""
