"""The queue protocol between loader and saver: messages, metadata, pacing, worker shares."""
