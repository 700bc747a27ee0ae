"""``dualfocus compare``: several connectors trained side by side on one feature store, one table.

``config.py`` (CompareConfig, the shipped tiny recipes), ``run.py`` (the driver: per connector train in a child
process, generate, score; resumable), ``table.py`` (terminal, Markdown, JSON), ``plot.py`` (the PNG).
"""
