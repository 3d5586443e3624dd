"""Model folders for tests built without torch (`numpy_folder.py`): the unit tier's models."""
