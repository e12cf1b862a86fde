"""relata's contract: message models, topic specs and settings. Imports nothing of relata's."""
