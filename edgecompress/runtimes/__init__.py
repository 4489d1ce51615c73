"""One class per runtime; each is imported only when a target needs it (see targets.RUNTIMES)."""
