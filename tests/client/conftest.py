"""gpt-chat is tested against a real gpt-serve: the live-server fixtures of tests/server, loaded
from their file under a name of their own (every conftest module is called `conftest`)."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "server_test_fixtures", Path(__file__).resolve().parents[1] / "server" / "conftest.py"
)
_server = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(_server)

tiny_checkpoint = _server.tiny_checkpoint
live_server = _server.live_server
paced_live_server = _server.paced_live_server
server_factory = _server.server_factory
openai_client = _server.openai_client
