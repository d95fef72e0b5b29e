"""Serving: the ranks' entry point, the continuous-batching engine, the leader→follower wire protocol and the HTTP server."""
