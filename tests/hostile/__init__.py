"""The hostile-input suite: every reader of a queue fed broken, hostile and oversized messages by plain clients."""
