"""Serving: the ranks' entry point (worker), the continuous-batching engine, the leader→follower wire protocol,
the HTTP server, the request schemas and the NeMo and OpenAI dialects."""
