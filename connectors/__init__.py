"""The model library: every connector between the feature store and a frozen LLM (see ``registry.py``)."""
