"""The HTTP layer: the OpenAI-compatible Quart app (`create_app` in `serving.http.factory`)."""
