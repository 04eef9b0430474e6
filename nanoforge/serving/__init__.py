"""Serving: an engine loop that owns one runtime engine, clients that talk to it (in-process or
over ZMQ), and the OpenAI-compatible HTTP server on top of any client."""
