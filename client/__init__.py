"""Client side of SAGE-OPD: the wire contract, prompt rendering and async clients.

Needs only pydantic, httpx and tenacity, so any process can talk to the services.
"""
