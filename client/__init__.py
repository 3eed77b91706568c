"""Clients of the OpenAI-compatible API that gpt-serve speaks. `client.chat` is gpt-chat, the
terminal chat client: it talks to any such server over HTTP and imports nothing of the server
or the model library (no torch), so it starts at once and runs on any machine."""
