"""A minimal stand-in for the parts of ComfyUI v0.8.0 that the bridge touches.

``server.PromptServer`` (sockets, send_sync -> messages -> publish_loop -> send/send_json/
send_bytes, the websocket handshake, /prompt, /queue, /history), ``execution.PromptExecutor``
and ``execution.PromptQueue``, and ``main.prompt_worker``, each with the same names, signatures
and ``client_id is not None`` guards as v0.8.0. Instead of running nodes, the executor replays,
from the worker thread, the calls the real execution made for a prompt (``script.py`` derives
them from the real recordings in tests/fixtures/comfyui). ``harness.py`` drives a whole scenario
over real websockets on 127.0.0.1 and returns every byte each client received.
"""
