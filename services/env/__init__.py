"""The environment service: text environments behind one HTTP interface, with sessions.

Importing this package stays light (no torch, no third-party environments):
the service's image is small, and environments load only when asked for.
"""
